"""How much of the planted language a trained run has learnt: loss per class vs the floors.

  python -m twotower_jax.planted_check --workdir=DIR

Restores the latest checkpoint of a run trained with data.source=planted, scores
every held-out window (causal towers: the full model's next-token loss) and prints
one JSON object: the model's mean loss on syntax and topic targets next to the
oracle floors of planted.reference_losses. Reads DIR only and writes nothing.
"""

from __future__ import annotations

import json
import sys

from absl import flags
import numpy as np

from twotower_jax import cli
from twotower_jax import errors


def per_class_loss(nll_N: np.ndarray, targets_N: np.ndarray, classes_V: np.ndarray) -> dict:
  """Mean loss over all targets and per planted class (PAD targets excluded)."""
  from twotower_jax.data import planted  # pylint: disable=g-import-not-at-top
  from twotower_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  keep_N = targets_N != tokenizer.PAD_ID
  cls_N = classes_V[targets_N]
  out = {'all': float(nll_N[keep_N].mean()), 'n': int(keep_N.sum())}
  for c, name in enumerate(planted.CLASS_NAMES):
    sel = keep_N & (cls_N == c)
    out[name] = float(nll_N[sel].mean()) if sel.any() else float('nan')
    out[f'n_{name}'] = int(sel.sum())
  return out


def class_losses(workdir: str) -> dict:
  """The restored model's per-class held-out loss and the oracle floors."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from twotower_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.data import planted  # pylint: disable=g-import-not-at-top
  config = run_lib.load_config(workdir)
  if config.data.source != 'planted' or config.model.tower_type != 'causal':
    raise errors.UserError(f'{workdir} was trained with data.source={config.data.source!r}, '
                           f'model.tower_type={config.model.tower_type!r}; planted_check needs '
                           "a 'planted' run with causal towers")
  restored = run_lib.restore(config, workdir)
  setup, step = restored.setup, restored.step

  @jax.jit
  def nll(params, windows_BxL1):
    out = setup.model.apply({'params': params}, windows_BxL1[:, :-1], deterministic=True)
    logp_BxLxV = jax.nn.log_softmax(out['logits_BxLxV'].astype(jnp.float32))
    return -jnp.take_along_axis(logp_BxLxV, windows_BxL1[:, 1:, None], -1)[..., 0]

  windows = setup.splits.val_windows
  batch = config.train.batch_size
  with jax.set_mesh(setup.mesh):
    nll_N = np.concatenate([np.asarray(nll(restored.params, jnp.asarray(windows[i:i + batch])))
                            .ravel() for i in range(0, len(windows), batch)])
  classes_V = planted.token_classes(config, setup.tokenizer)
  model = per_class_loss(nll_N, windows[:, 1:].ravel(), classes_V)
  return {'workdir': workdir, 'step': int(step), 'model': model,
          'floors': planted.reference_losses(config.data)}


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; use --workdir=DIR')
  print(json.dumps(class_losses(_WORKDIR.value), indent=1))


if __name__ == '__main__':
  # Defined only when run as a command: the library functions above are imported next
  # to analyze, which defines its own --workdir.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A run trained with data.source=planted.')
  flags.mark_flags_as_required(['workdir'])
  sys.exit(cli.run(main))
