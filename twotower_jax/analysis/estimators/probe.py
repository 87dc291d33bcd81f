"""The `probe` estimator (the paper's phases 2 and 3): a fresh head per frozen tower.

Each tower k gets its own untied head (Dense -> GELU -> LN -> own output matrix and
bias) trained with the phase-1 objective on tower k's final states alone; per
position the value is log p_k(target) under that head. A one-tower run gets two
probes on two random halves of its units (the split-single-tower control). Heads
are saved under DIR/analysis/probe/ and reused for the same checkpoint and settings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators.base import Context, Estimator
from twotower_jax.model import towers

log = logging.getLogger('twotower_jax')


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
  return os.path.join(analysis_dir, workdir_lib.PROBE_DIR, f'probe_step{step}.npz')


def probe_step_fn(ctx: Context, tx: optax.GradientTransformation):
  """One jitted Adam step of the probe heads on frozen tower states:
  (heads, opt_state, params, window_BxL1, rng) -> (heads, opt_state, loss)."""
  cfg = ctx.model.cfg
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
  return step


def train_probes(ctx: Context) -> tuple[dict[str, jax.Array], list[float]]:
  """Trains every tower's probe with the phase-1 objective; tower params are never updated."""
  a, cfg = ctx.config.analysis, ctx.model.cfg
  n = probe_towers(ctx)
  key = jax.random.PRNGKey(int(a.seed))
  p = probe_init(key, n, cfg.d_model, cfg.vocab_size)
  tx = optax.adam(float(a.probe_lr))
  opt = tx.init(p)
  step = probe_step_fn(ctx, tx)
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
    return base.target_log_probs(logits, jnp.broadcast_to(ex['targets'], logits.shape[:-1])), {}
  return fn


base.register('probe', Estimator(
    prepare=_probe_prepare, values=_probe_values,
    description='mean log-likelihood of the item under a probe head trained on one tower alone'))
