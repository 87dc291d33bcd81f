"""Estimators of tower preference: the registry, and scoring on one fixed set of positions.

Each estimator gives, at every scored position, one value per tower (probe.py: the
tower probe's log-likelihood of the target; ablation.py: the drop in the model's
log-likelihood when that tower's states are replaced; gate.py: the latent gate's
posterior responsibility). The frozen towers run once over the scored windows
(`tower_pass`); every estimator reads their cached final states. Per vocabulary item
the values are summed on device (segment sums over target ids), never in a Python
loop over tokens. A new estimator is one module that calls `register`; the analysis
looks it up by `analysis.estimators`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax.analysis import clusters
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import towers

EVAL_KEY = 0  # make_example key of scored batch i: fold_in(PRNGKey(EVAL_KEY), i) (MLM masks)


@dataclasses.dataclass
class Context:
  """What every estimator needs: the frozen model, its params and the data."""
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  eval_batches: list[np.ndarray]  # windows_BxL1 (PAD rows fill the last batch)
  train_windows: np.ndarray
  analysis_dir: str
  step: int
  states: list[jax.Array] | None = None  # h_NxBxLxH per eval batch (tower_pass)
  eval_docs: list[np.ndarray] | None = None  # docs_BxL1: each token's held-out document
  item_loss: np.ndarray | None = None  # float[V]: the model's mean NLL per item (tower_pass)


@dataclasses.dataclass(frozen=True)
class Estimator:
  """prepare(ctx) -> state; values(ctx) -> fn(params, state, example, h_NxBxLxH, key) ->
  (v_NxBxL, extras), where h is the batch's cached final tower states and key the
  batch's own random key (for estimators that draw).

  `extras` maps a name to per-position values x_BxL whose per-item mean becomes the
  preference.csv column EST_<name>. `skip_reason(config)` says why the estimator does
  not apply to a run (None: it does). `description` (what one tower's value means)
  goes into summary.json, so the report needs no model code; so does `summary(state)`
  (e.g. the probe's training record). `token_lean`: the
  per-position values are responsibilities, so v_0 - v_1 at each token is that
  token's lean in [-1, 1] (the token view then shows tokens, not item means).
  """
  prepare: Callable[[Context], Any]
  values: Callable[[Context], Callable]
  description: str
  skip_reason: Callable[[ml_collections.ConfigDict], str | None] = lambda config: None
  token_lean: bool = False
  summary: Callable[[Any], dict[str, Any]] | None = None  # prepared state -> summary.json fields


ESTIMATORS: dict[str, Estimator] = {}


def register(name: str, estimator: Estimator) -> Estimator:
  ESTIMATORS[name] = estimator
  return estimator


def get(name: str) -> Estimator:
  if name not in ESTIMATORS:
    raise config_lib.unknown_name('analysis.estimators entry', name, ESTIMATORS)
  return ESTIMATORS[name]


def eval_batches(windows: np.ndarray, n_windows: int, batch_size: int) -> list[np.ndarray]:
  """The first n_windows (0: all) held-out windows in fixed batches; PAD rows (never
  scored) fill the last."""
  rows = windows[:n_windows] if n_windows else windows
  short = (-len(rows)) % batch_size
  if short:
    rows = np.concatenate([rows, np.full((short, windows.shape[1]), tokenizer_lib.PAD_ID,
                                         windows.dtype)])
  return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def scored_batches(windows: np.ndarray, n_windows: int, batch_size: int,
                   draws: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(eval_batches, their document ids): the held-out batches `draws` times over. Batch i's
  example key is its own (`example`), so each repeat draws new masked-LM masks and more
  positions are scored (a tower type without random masks scores the same positions again:
  use 1); a repeat keeps its windows' documents, so intervals still cluster by document."""
  batches = eval_batches(windows, n_windows, batch_size)
  docs = clusters.window_docs(np.concatenate(batches))
  docs_list = [docs[i:i + batch_size] for i in range(0, len(docs), batch_size)]
  return batches * draws, docs_list * draws


def example(model, window_BxL1, index=0) -> dict[str, jax.Array]:
  """The scored example of eval batch `index`: inputs, targets and weights, with that
  batch's own key (fold_in of EVAL_KEY, so MLM masks differ from batch to batch) and the
  fill rows (all-PAD windows: a real window starts with a corpus token) never scored."""
  window_BxL1 = jnp.asarray(window_BxL1)
  key = jax.random.fold_in(jax.random.PRNGKey(EVAL_KEY), index)
  ex = towers.get(model.cfg.tower_type).make_example(window_BxL1, key, model.cfg)
  real_B = (window_BxL1[:, 0] != tokenizer_lib.PAD_ID).astype(ex['weights'].dtype)
  return dict(ex, weights=ex['weights'] * real_B[:, None])


def position_docs(ctx: 'Context', index: int) -> np.ndarray:
  """docs_BxL of eval batch `index`: the document of each position's target (ctx.eval_docs,
  computed from the batches on first use: fill rows get the last document, never scored)."""
  if ctx.eval_docs is None:
    docs = clusters.window_docs(np.concatenate(ctx.eval_batches))
    b = ctx.eval_batches[0].shape[0]
    ctx.eval_docs = [docs[i:i + b] for i in range(0, len(docs), b)]
  docs_BxL1 = ctx.eval_docs[index]
  return docs_BxL1[:, 1:] if towers.get(ctx.model.cfg.tower_type).left_to_right else (
      docs_BxL1[:, :-1])


def target_log_probs(logits_XxV: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[target] at every position (float32)."""
  logp = jax.nn.log_softmax(logits_XxV.astype(jnp.float32), -1)
  return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


def gate_outputs(model, params, ex: dict[str, jax.Array], h_NxBxLxH: jax.Array,
                 states_fn: Callable | None = None) -> dict[str, jax.Array]:
  """The model's outputs from cached tower states, optionally edited by `states_fn`.

  With pondering each pass reruns the towers, so those models run in full (the edit
  then applies to every pass, as the model's `states_fn` hook does).
  """
  if model.cfg.pondering.steps:
    return model.apply({'params': params}, ex['inputs'], deterministic=True, states_fn=states_fn)
  return model.apply({'params': params}, ex['inputs'], deterministic=True, states_fn=states_fn,
                     tower_states=h_NxBxLxH)


# ---------------------------------------------------------------- aggregation


def item_sums(v_NxP: jax.Array, targets_P: jax.Array, mask_P: jax.Array, vocab: int,
              key: jax.Array, n_control: int = 1) -> dict[str, jax.Array]:
  """Per item: count, sum and cross-product sums of the tower values, and the control.

  The control: K independent random per-position permutations of the towers (towers
  exchangeable at each occurrence); the K draws give each statistic's distribution under
  that null. `perm_sum_KxNxV` sums the permuted values; with two towers a permutation only
  flips the sign of v0 - v1, so `perm_pref_sum_KxV` sums the flipped differences instead.
  """
  n = v_NxP.shape[0]
  w_P = mask_P.astype(jnp.float32)
  seg = lambda x: jax.ops.segment_sum(x, targets_P, num_segments=vocab)
  v_NxP = jnp.where(mask_P[None], v_NxP.astype(jnp.float32), 0.0)

  cross_PxNxN = v_NxP.T[:, :, None] * v_NxP.T[:, None, :]
  out = {'count_V': seg(w_P), 'sum_NxV': jax.vmap(seg)(v_NxP),
         'cross_VxNxN': seg(cross_PxNxN.reshape(-1, n, n))}
  # All K draws at once, one scatter (a loop over the draws was 3x slower at K = 999 on CPU).
  if n == 2:  # shuffling two towers flips the sign of v0 - v1: sum the flipped differences
    sign_KxP = jnp.where(jax.random.bernoulli(key, 0.5, (n_control, v_NxP.shape[1])), -1.0, 1.0)
    out['perm_pref_sum_KxV'] = seg((sign_KxP * (v_NxP[0] - v_NxP[1])).T).T
  else:
    perm_KxNxP = jnp.argsort(jax.random.uniform(key, (n_control, n, v_NxP.shape[1])), axis=1)
    shuffled_KxNxP = jnp.take_along_axis(jnp.broadcast_to(v_NxP, perm_KxNxP.shape), perm_KxNxP,
                                         axis=1)
    out['perm_sum_KxNxV'] = seg(shuffled_KxNxP.transpose(2, 0, 1)).transpose(1, 2, 0)
  return out


def preference(mean_NxV: np.ndarray):
  """(pref_V, best_V, weights_VxN): N=2: t0 - t1; else best tower minus mean of the others."""
  n, v = mean_NxV.shape
  if n == 2:
    w = np.tile(np.array([1.0, -1.0]), (v, 1))
    best = np.where(mean_NxV[0] >= mean_NxV[1], 0, 1)
  else:
    best = np.argmax(np.nan_to_num(mean_NxV, nan=-np.inf), axis=0)
    w = np.full((v, n), -1.0 / max(n - 1, 1))
    w[np.arange(v), best] = 1.0
  pref = np.einsum('vn,nv->v', w, mean_NxV)
  return pref, best, w


def normalized(mean_NxV: np.ndarray, weights_VxN: np.ndarray) -> np.ndarray:
  """pref_V / sum_k |w_k| |v_k|: two towers (v0 - v1) / (|v0| + |v1|), in [-1, 1]; NaN
  where every value is 0. Comparable across estimators and items of any difficulty."""
  with np.errstate(invalid='ignore', divide='ignore'):
    num = np.einsum('vn,nv->v', weights_VxN, mean_NxV)
    den = np.einsum('vn,nv->v', np.abs(weights_VxN), np.abs(mean_NxV))
    return np.where(den > 0, num / den, np.nan)


def finish(sums: dict[str, np.ndarray], z: float = 1.959964) -> dict[str, np.ndarray]:
  """Per item means, preference, its 95% interval over occurrences (normal), control pref."""
  count = sums['count_V']
  with np.errstate(invalid='ignore', divide='ignore'):
    mean = sums['sum_NxV'] / count
    pref, best, w = preference(mean)
    second = sums['cross_VxNxN'] / count[:, None, None]
    cov = second - mean.T[:, :, None] * mean.T[:, None, :]
    var = np.einsum('vn,vnm,vm->v', w, cov, w) * count / (count - 1)
    se = np.sqrt(np.maximum(var, 0.0) / count)
    if 'perm_pref_sum_KxV' in sums:  # two towers: the shuffled t0 - t1 directly
      ctrl_KxV = sums['perm_pref_sum_KxV'] / count
    else:
      ctrl_KxV = np.stack([preference(perm_NxV / count)[0]
                           for perm_NxV in sums['perm_sum_KxNxV']])
  few = count < 2
  lo, hi = pref - z * se, pref + z * se
  lo[few], hi[few] = np.nan, np.nan
  out = {'count': count, 'mean_NxV': mean, 'pref': pref, 'best': best, 'pref_lo': lo,
         'pref_hi': hi, 'control_pref': ctrl_KxV[0], 'control_pref_KxV': ctrl_KxV, 'extras': {},
         'weights_VxN': w, 'pref_norm': normalized(mean, w)}
  for k, s in sums.items():
    if k.startswith('extra_'):
      with np.errstate(invalid='ignore', divide='ignore'):
        out['extras'][k[6:]] = s / count
  return out


def batch_sums_fn(ctx: Context, name: str) -> Callable:
  """Estimator `name`'s jitted pass over one batch: (params, state, window_BxL1, index,
  h_NxBxLxH, key) -> (per-item sums (`item_sums`, plus `extra_*` of its extras), the
  per-position values v_NxBxL, the scored mask_BxL, the targets_BxL)."""
  values_fn = get(name).values(ctx)
  vocab = ctx.model.cfg.vocab_size
  n_control = int(ctx.config.analysis.n_control)

  @jax.jit
  def batch_sums(params, state, window_BxL1, index, h_NxBxLxH, key):
    ex = example(ctx.model, window_BxL1, index)
    v_NxBxL, extras = values_fn(params, state, ex, h_NxBxLxH, jax.random.fold_in(key, 1))
    n = v_NxBxL.shape[0]
    targets_P = ex['targets'].reshape(-1)
    mask_P = ex['weights'].reshape(-1) > 0
    out = item_sums(v_NxBxL.reshape(n, -1), targets_P, mask_P, vocab, key, n_control)
    for k, x_BxL in extras.items():
      out['extra_' + k] = jax.ops.segment_sum(jnp.where(mask_P, x_BxL.reshape(-1), 0.0),
                                              targets_P, num_segments=vocab)
    return out, v_NxBxL, ex['weights'] > 0, ex['targets']
  return batch_sums


def score(ctx: Context, name: str) -> dict[str, Any]:
  """Runs estimator `name` over the eval batches: per-item results, timing and its
  prepared `state`."""
  est = get(name)
  t0 = time.perf_counter()
  state = est.prepare(ctx)
  t_prep = time.perf_counter() - t0
  seed = int(ctx.config.analysis.seed)
  states = ensure_states(ctx)
  batch_sums = batch_sums_fn(ctx, name)

  jax.block_until_ready(batch_sums(ctx.params, state, ctx.eval_batches[0], 0, states[0],
                                   jax.random.PRNGKey(seed)))  # compile outside the timing
  t1 = time.perf_counter()
  total = None
  per_doc = clusters.DocItemSums(ctx.model.cfg.vocab_size)
  for i, window in enumerate(ctx.eval_batches):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    out, v_NxBxL, mask_BxL, targets_BxL = batch_sums(ctx.params, state, window, i, states[i],
                                                     key)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
    mask_BxL = np.asarray(mask_BxL)
    per_doc.add(position_docs(ctx, i)[mask_BxL], np.asarray(targets_BxL)[mask_BxL],
                np.asarray(v_NxBxL)[:, mask_BxL])
  sums = {k: np.asarray(v, np.float64) for k, v in jax.device_get(total).items()}
  seconds = time.perf_counter() - t1
  res = finish(sums)
  res['doc_sums'] = per_doc.result()
  # per-item intervals with documents as clusters (replacing the per-occurrence ones)
  res['pref_lo'], res['pref_hi'] = clusters.pref_intervals(res['doc_sums'], res['weights_VxN'])
  n_pos = int(sums['count_V'].sum())
  res.update(seconds=seconds, prepare_seconds=t_prep, n_positions=n_pos,
             tokens_per_s=n_pos / max(seconds, 1e-9), state=state)
  return res


def tower_pass_fn(ctx: Context) -> Callable:
  """The model's jitted forward pass over one batch: (params, window_BxL1, index) -> (final
  tower states h_NxBxLxH, [summed negative log-likelihood of the scored targets, their
  weight], per item the summed NLL and weight 2xV)."""
  vocab = ctx.model.cfg.vocab_size

  @jax.jit
  def forward(params, window_BxL1, index):
    ex = example(ctx.model, window_BxL1, index)
    out = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)
    nll_BxL = -target_log_probs(out['logits_BxLxV'], ex['targets']) * ex['weights']
    seg = lambda x: jax.ops.segment_sum(x.reshape(-1), ex['targets'].reshape(-1),
                                        num_segments=vocab)
    return (out['tower_states_NxBxLxH'], jnp.stack([jnp.sum(nll_BxL), jnp.sum(ex['weights'])]),
            jnp.stack([seg(nll_BxL), seg(ex['weights'])]))
  return forward


def tower_pass(ctx: Context) -> dict[str, float]:
  """Runs the model once over the scored windows: caches every batch's final tower states
  in ctx.states and returns the model's own CE on the scored positions with the speed."""
  forward = tower_pass_fn(ctx)
  jax.block_until_ready(forward(ctx.params, ctx.eval_batches[0], 0))  # compile outside timing
  t = time.perf_counter()
  outs = [forward(ctx.params, w, i) for i, w in enumerate(ctx.eval_batches)]
  ctx.states = [h for h, _, _ in outs]
  loss, n = np.sum(np.asarray(jax.device_get([s for _, s, _ in outs]), np.float64), axis=0)
  nll_V, count_V = np.sum(np.asarray(jax.device_get([x for _, _, x in outs]), np.float64), 0)
  with np.errstate(invalid='ignore', divide='ignore'):
    ctx.item_loss = nll_V / count_V
  seconds = time.perf_counter() - t
  return {'loss': float(loss / max(n, 1)), 'n_positions': int(n), 'seconds': seconds,
          'tokens_per_s': float(n / max(seconds, 1e-9))}


def ensure_states(ctx: Context) -> list[jax.Array]:
  """ctx.states, computed by `tower_pass` on first use."""
  if ctx.states is None:
    tower_pass(ctx)
  return ctx.states
