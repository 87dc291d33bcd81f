"""token_view.json: a few held-out passages, each piece coloured by the tower it leans to."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from twotower_jax.analysis.estimators import base
from twotower_jax.data import tokenizer as tokenizer_lib


def token_view(ctx: base.Context, results: dict[str, Any], pieces, states: dict[str, Any]
               ) -> dict[str, Any]:
  """Passages (the first held-out windows), per piece a lean in [-1, 1], +1 = tower 0.

  An estimator registered with `token_lean` (the latent gate's posterior) colours each
  token by its own values v_0 - v_1; otherwise the first estimator colours each piece
  by its item's preference over the largest |preference| (per item, not per token).
  `states` holds each estimator's prepared state (what `score` used).
  """
  n_pass = int(ctx.config.analysis.token_view_passages)
  per_token = [name for name in results if base.get(name).token_lean]
  est = per_token[0] if per_token else next(iter(results), None)
  if est is None or n_pass == 0:
    return {'estimator': est, 'note': 'no estimator ran', 'passages': []}
  res = results[est]
  if per_token:
    note = f'per-token {est} value v_0 - v_1'
    values_fn = jax.jit(base.get(est).values(ctx))
  else:
    note = (f"each item's {est} preference divided by the largest |preference| among items with "
            'count >= min_count (per item, not per token)')
    keep = (res['count'] >= ctx.config.analysis.min_count) & np.isfinite(res['pref'])
    scale = max(float(np.max(np.abs(res['pref'][keep]))) if keep.any() else 1.0, 1e-12)
  passages = []
  batch = ctx.eval_batches[0].shape[0]
  cached = base.ensure_states(ctx)
  for j in range(min(n_pass, batch * len(ctx.eval_batches))):
    i, row = divmod(j, batch)  # the window's row of its scored batch (the same masks)
    ex = jax.tree.map(lambda x: x[row:row + 1],
                      base.example(ctx.model, ctx.eval_batches[i], i))
    targets = np.asarray(ex['targets'][0])
    if np.asarray(ctx.eval_batches[i])[row, 0] == tokenizer_lib.PAD_ID:
      break  # a fill row: no more held-out windows
    if per_token:
      h_NxBxLxH = cached[i][:, row:row + 1]
      v_NxBxL, _ = values_fn(ctx.params, states.get(est), ex, h_NxBxLxH,
                             jax.random.PRNGKey(int(ctx.config.analysis.seed)))
      v_NxL = np.asarray(v_NxBxL)[:, 0]
      lean = np.where(np.asarray(ex['weights'][0]) > 0, v_NxL[0] - v_NxL[1], np.nan)
    else:
      lean = np.clip(res['pref'][targets] / scale, -1, 1)
      lean = np.where(targets == tokenizer_lib.PAD_ID, np.nan, lean)
    passages.append({'pieces': [pieces[t] for t in targets],
                     'lean': [None if not np.isfinite(x) else round(float(x), 4) for x in lean]})
  return {'estimator': est, 'note': note + '; +1 = tower 0, -1 = tower 1, null = not scored',
          'passages': passages}
