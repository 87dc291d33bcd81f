"""Estimators of tower preference, scored on one fixed set of held-out positions.

Each estimator gives, at every scored position, one value per tower (probe: the
tower probe's log-likelihood of the target; ablation: the drop in the model's
log-likelihood when that tower's states are replaced by their eval-set mean;
gate: the latent gate's posterior responsibility). Per vocabulary item these are
summed on device (segment sums over target ids), never in a Python loop over
tokens. Register a new estimator with `register`; analyze looks it up by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from twotower_jax import gates
from twotower_jax import tokenizer as tokenizer_lib
from twotower_jax import towers

log = logging.getLogger('twotower_jax')

EVAL_KEY = 0  # make_example key for scored positions: MLM masks are fixed


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


@dataclasses.dataclass(frozen=True)
class Estimator:
  """prepare(ctx) -> state; values(ctx) -> fn(params, state, example) -> (v_NxBxL, extras)."""
  prepare: Callable[[Context], Any]
  values: Callable[[Context], Callable]
  skip_reason: Callable[[ml_collections.ConfigDict], str | None]


ESTIMATORS: dict[str, Estimator] = {}


def register(name: str, estimator: Estimator) -> None:
  ESTIMATORS[name] = estimator


def eval_batches(windows: np.ndarray, n_windows: int, batch_size: int) -> list[np.ndarray]:
  """The first n_windows held-out windows in fixed batches; PAD rows (weight 0) fill the last."""
  rows = windows[:n_windows]
  short = (-len(rows)) % batch_size
  if short:
    rows = np.concatenate([rows, np.full((short, windows.shape[1]), tokenizer_lib.PAD_ID,
                                         windows.dtype)])
  return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def example(model, window_BxL1) -> dict[str, jax.Array]:
  """The scored example of a window: inputs, targets, weights with the fixed eval key."""
  return towers.get(model.cfg.tower_type).make_example(
      jnp.asarray(window_BxL1), jax.random.PRNGKey(EVAL_KEY), model.cfg)


def target_log_probs(logits_XxV: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[target] at every position (float32)."""
  logp = jax.nn.log_softmax(logits_XxV.astype(jnp.float32), -1)
  return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


# ---------------------------------------------------------------- aggregation


def item_sums(v_NxP: jax.Array, targets_P: jax.Array, mask_P: jax.Array, vocab: int,
              key: jax.Array) -> dict[str, jax.Array]:
  """Per item: count, sum and cross-product sums of the tower values, and the control.

  `perm_sum_NxV` sums the values after a random per-position permutation of the
  towers (the shuffled-label control: towers exchangeable at each occurrence).
  """
  n = v_NxP.shape[0]
  w_P = mask_P.astype(jnp.float32)
  seg = lambda x: jax.ops.segment_sum(x, targets_P, num_segments=vocab)
  v_NxP = jnp.where(mask_P[None], v_NxP.astype(jnp.float32), 0.0)
  perm_NxP = jnp.argsort(jax.random.uniform(key, v_NxP.shape), axis=0)
  vp_NxP = jnp.take_along_axis(v_NxP, perm_NxP, axis=0)
  cross_PxNxN = v_NxP.T[:, :, None] * v_NxP.T[:, None, :]
  return {'count_V': seg(w_P), 'sum_NxV': jax.vmap(seg)(v_NxP),
          'cross_VxNxN': seg(cross_PxNxN.reshape(-1, n, n)),
          'perm_sum_NxV': jax.vmap(seg)(vp_NxP)}


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
    ctrl, _, _ = preference(sums['perm_sum_NxV'] / count)
  few = count < 2
  lo, hi = pref - z * se, pref + z * se
  lo[few], hi[few] = np.nan, np.nan
  out = {'count': count, 'mean_NxV': mean, 'pref': pref, 'best': best, 'pref_lo': lo,
         'pref_hi': hi, 'control_pref': ctrl}
  for k, s in sums.items():
    if k.startswith('extra_'):
      with np.errstate(invalid='ignore', divide='ignore'):
        out[k[6:]] = s / count
  return out


def score(ctx: Context, name: str) -> dict[str, Any]:
  """Runs estimator `name` over the eval batches: per-item results + timing."""
  est = ESTIMATORS[name]
  t0 = time.perf_counter()
  state = est.prepare(ctx)
  t_prep = time.perf_counter() - t0
  values_fn = est.values(ctx)
  vocab = ctx.model.cfg.vocab_size
  seed = int(ctx.config.analysis.seed)

  @jax.jit
  def batch_sums(params, state, window_BxL1, key):
    ex = example(ctx.model, window_BxL1)
    v_NxBxL, extras = values_fn(params, state, ex)
    n = v_NxBxL.shape[0]
    targets_P = ex['targets'].reshape(-1)
    mask_P = ex['weights'].reshape(-1) > 0
    out = item_sums(v_NxBxL.reshape(n, -1), targets_P, mask_P, vocab, key)
    for k, x_BxL in extras.items():
      out['extra_' + k] = jax.ops.segment_sum(jnp.where(mask_P, x_BxL.reshape(-1), 0.0),
                                              targets_P, num_segments=vocab)
    return out

  jax.block_until_ready(batch_sums(ctx.params, state, ctx.eval_batches[0],
                                   jax.random.PRNGKey(seed)))  # compile outside the timing
  t1 = time.perf_counter()
  total = None
  for i, window in enumerate(ctx.eval_batches):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    out = batch_sums(ctx.params, state, window, key)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  sums = {k: np.asarray(v, np.float64) for k, v in jax.device_get(total).items()}
  seconds = time.perf_counter() - t1
  res = finish(sums)
  n_pos = int(sums['count_V'].sum())
  res.update(seconds=seconds, prepare_seconds=t_prep, n_positions=n_pos,
             tokens_per_s=n_pos / max(seconds, 1e-9))
  return res


def eval_loss(ctx: Context) -> dict[str, float]:
  """The model's own CE on the scored positions, and the plain forward pass's speed."""
  @jax.jit
  def sums(params, window_BxL1):
    ex = example(ctx.model, window_BxL1)
    out = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)
    ll_BxL = target_log_probs(out['logits_BxLxV'], ex['targets'])
    return -jnp.sum(ll_BxL * ex['weights']), jnp.sum(ex['weights'])

  jax.block_until_ready(sums(ctx.params, ctx.eval_batches[0]))  # compile outside the timing
  t = time.perf_counter()
  total = [sums(ctx.params, w) for w in ctx.eval_batches]
  loss, n = np.sum(np.asarray(jax.device_get(total), np.float64), axis=0)
  seconds = time.perf_counter() - t
  return {'loss': float(loss / max(n, 1)), 'n_positions': int(n), 'seconds': seconds,
          'tokens_per_s': float(n / max(seconds, 1e-9))}


# ---------------------------------------------------------------- ablation


def _mean_states(ctx: Context) -> jax.Array:
  """mu_NxH: each tower's final state averaged over the scored positions."""
  @jax.jit
  def sums(params, window_BxL1):
    ex = example(ctx.model, window_BxL1)
    h = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)[
        'tower_states_NxBxLxH'].astype(jnp.float32)
    w_BxL = ex['weights']
    return jnp.einsum('nblh,bl->nh', h, w_BxL), jnp.sum(w_BxL)

  total_h, total_w = None, 0.0
  for window in ctx.eval_batches:
    h, w = sums(ctx.params, window)
    total_h = h if total_h is None else total_h + h
    total_w = total_w + w
  return total_h / jnp.maximum(total_w, 1.0)


def _replace_towers(mu_NxH: jax.Array, ablate_N: np.ndarray):
  """states_fn: towers where ablate_N is True get their mean state at every position."""
  def fn(h_NxBxLxH):
    m = jnp.asarray(ablate_N)[:, None, None, None]
    return jnp.where(m, mu_NxH[:, None, None, :].astype(h_NxBxLxH.dtype), h_NxBxLxH)
  return fn


def _ablation_values(ctx: Context):
  n = ctx.model.cfg.n_towers

  def fn(params, mu_NxH, ex):
    def ll(ablate):
      states_fn = None if not any(ablate) else _replace_towers(mu_NxH, np.asarray(ablate))
      out = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True,
                            states_fn=states_fn)
      return target_log_probs(out['logits_BxLxV'], ex['targets'])
    full = ll([False] * n)
    drop = [full - ll([j == k for j in range(n)]) for k in range(n)]
    extras = {}
    if n == 2:  # exact two-player Shapley values of the log-likelihood
      none = ll([True, True])
      only0, only1 = full - drop[1], full - drop[0]  # tower 1 ablated / tower 0 ablated
      extras['shapley_t0'] = 0.5 * ((only0 - none) + (full - only1))
      extras['shapley_t1'] = 0.5 * ((only1 - none) + (full - only0))
    return jnp.stack(drop), extras
  return fn


register('ablation', Estimator(
    prepare=_mean_states, values=_ablation_values,
    skip_reason=lambda c: 'needs at least two towers' if c.model.n_towers < 2 else None))


# ---------------------------------------------------------------- latent gate posterior


def _gate_values(ctx: Context):
  def fn(params, _, ex):
    out = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)
    r_NxBxL = gates.latent_posteriors(out['tower_logits_NxBxLxV'], out['gate_log_weights_NxBxL'],
                                      ex['targets'])
    return r_NxBxL, {}
  return fn


def gate_posteriors(model, params, window_BxL1) -> tuple[np.ndarray, np.ndarray]:
  """(r_NxBxL, weights_BxL) of a batch: for the token view of latent-gate models."""
  ex = example(model, window_BxL1)
  out = model.apply({'params': params}, ex['inputs'], deterministic=True)
  r = gates.latent_posteriors(out['tower_logits_NxBxLxV'], out['gate_log_weights_NxBxL'],
                              ex['targets'])
  return np.asarray(r), np.asarray(ex['weights'])


register('gate', Estimator(
    prepare=lambda ctx: None, values=_gate_values,
    skip_reason=lambda c: (None if c.model.gate == 'latent' else
                           f'needs model.gate=latent (this run: {c.model.gate})')))


# ---------------------------------------------------------------- probes (phases 2 and 3)

PROBE_DIR = 'probe'


def probe_init(key: jax.Array, n: int, h: int, vocab: int) -> dict[str, jax.Array]:
  """N untied heads: Dense -> GELU -> LN -> own output matrix and bias (DESIGN.md section 2)."""
  k1, k2 = jax.random.split(key)
  return {'dense_NxHxH': 0.02 * jax.random.normal(k1, (n, h, h)), 'dense_b_NxH': jnp.zeros((n, h)),
          'ln_scale_NxH': jnp.ones((n, h)), 'ln_bias_NxH': jnp.zeros((n, h)),
          'out_NxVxH': 0.02 * jax.random.normal(k2, (n, vocab, h)),
          'out_b_NxV': jnp.zeros((n, vocab))}


def probe_logits(p: dict[str, jax.Array], h_NxBxLxH: jax.Array) -> jax.Array:
  """logits_NxBxLxV of each tower's probe on its own states."""
  z = jnp.einsum('nblh,nhk->nblk', h_NxBxLxH.astype(jnp.float32), p['dense_NxHxH'])
  z = jax.nn.gelu(z + p['dense_b_NxH'][:, None, None], approximate=False)
  mu = z.mean(-1, keepdims=True)
  z = (z - mu) * jax.lax.rsqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
  z = z * p['ln_scale_NxH'][:, None, None] + p['ln_bias_NxH'][:, None, None]
  return jnp.einsum('nblh,nvh->nblv', z, p['out_NxVxH']) + p['out_b_NxV'][:, None, None]


def probe_towers(ctx: Context) -> int:
  """Probe heads: one per tower, or two (random halves of the units) for a one-tower run."""
  return max(ctx.model.cfg.n_towers, 2)


def probe_states(ctx: Context, params, inputs_BxL) -> jax.Array:
  """Frozen final tower states; a one-tower run is split into two random halves of units."""
  h = ctx.model.apply({'params': params}, inputs_BxL, deterministic=True)['tower_states_NxBxLxH']
  h = jax.lax.stop_gradient(h)
  if ctx.model.cfg.n_towers == 1:
    d = h.shape[-1]
    perm = np.random.default_rng(int(ctx.config.analysis.seed)).permutation(d)
    half = np.zeros(d, np.float32)
    half[perm[:d // 2]] = 1.0
    h = jnp.stack([h[0] * half, h[0] * (1.0 - half)])
  return h


def _probe_meta(ctx: Context) -> dict[str, Any]:
  a = ctx.config.analysis
  return {'checkpoint_step': int(ctx.step), 'probe_steps': int(a.probe_steps),
          'probe_lr': float(a.probe_lr), 'probe_batch_size': int(a.probe_batch_size),
          'seed': int(a.seed), 'n_probes': probe_towers(ctx)}


def probe_path(analysis_dir: str, step: int) -> str:
  return os.path.join(analysis_dir, PROBE_DIR, f'probe_step{step}.npz')


def train_probes(ctx: Context) -> tuple[dict[str, jax.Array], list[float]]:
  """Trains every tower's probe with the phase-1 objective; tower params are never updated."""
  a, cfg = ctx.config.analysis, ctx.model.cfg
  n = probe_towers(ctx)
  key = jax.random.PRNGKey(int(a.seed))
  p = probe_init(key, n, cfg.d_model, cfg.vocab_size)
  tx = optax.adam(float(a.probe_lr))
  opt = tx.init(p)
  make_example = towers.get(cfg.tower_type).make_example

  @jax.jit
  def step(p, opt, params, window_BxL1, rng):
    ex = make_example(window_BxL1, rng, cfg)
    h = probe_states(ctx, params, ex['inputs'])

    def loss_fn(p):
      logits = probe_logits(p, h)
      ce_NxBxL = optax.softmax_cross_entropy_with_integer_labels(
          logits, jnp.broadcast_to(ex['targets'], logits.shape[:-1]))
      w = ex['weights']
      return jnp.sum(ce_NxBxL * w) / jnp.maximum(jnp.sum(w), 1.0)  # sum over towers: independent
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  rng = np.random.default_rng(int(a.seed))
  windows = ctx.train_windows
  losses = []
  for i in range(int(a.probe_steps)):
    idx = rng.integers(0, len(windows), size=int(a.probe_batch_size))
    p, opt, loss = step(p, opt, ctx.params, jnp.asarray(windows[idx]),
                        jax.random.fold_in(key, i + 1))
    if i % 50 == 0 or i == int(a.probe_steps) - 1:
      losses.append(float(loss) / n)
  return p, losses


def _probe_prepare(ctx: Context) -> dict[str, jax.Array]:
  """Loads the probe heads saved for this checkpoint and settings, or trains and saves them."""
  path = probe_path(ctx.analysis_dir, ctx.step)
  meta = _probe_meta(ctx)
  if os.path.exists(path):
    with np.load(path) as f:
      saved_meta = json.loads(str(f['meta']))
      if saved_meta == meta:
        log.info('probe: reusing heads from %s', path)
        return {k: jnp.asarray(f[k]) for k in f.files if k != 'meta'}
    log.info('probe: %s was trained with other settings; retraining', path)
  t = time.perf_counter()
  p, losses = train_probes(ctx)
  log.info('probe: trained %d heads for %d steps in %.1fs (loss per head %s)',
           meta['n_probes'], meta['probe_steps'], time.perf_counter() - t,
           ' -> '.join(f'{x:.3f}' for x in losses[:1] + losses[-1:]))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, meta=json.dumps(meta),
           **{k: np.asarray(v) for k, v in p.items()})
  os.replace(tmp, path)
  return p


def _probe_values(ctx: Context):
  def fn(params, probe_params, ex):
    h = probe_states(ctx, params, ex['inputs'])
    logits = probe_logits(probe_params, h)
    return target_log_probs(logits, jnp.broadcast_to(ex['targets'], logits.shape[:-1])), {}
  return fn


register('probe', Estimator(prepare=_probe_prepare, values=_probe_values,
                            skip_reason=lambda c: None))
