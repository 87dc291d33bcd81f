"""The `ablation` estimator: the log-likelihood each tower's states are worth at the gate.

Per position and tower k: log p(target) of the full model minus log p(target) when
tower k's final states are replaced by their mean over the scored positions (the
model's `states_fn` hook). For two towers it also writes the exact two-player
Shapley values of the log-likelihood (`shapley_t0`, `shapley_t1`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators.base import Context, Estimator


def state_sums_fn(ctx: Context):
  """Jitted (params, window_BxL1) -> (weighted sum of each tower's final states h_NxH,
  summed weight) over one batch."""
  @jax.jit
  def sums(params, window_BxL1):
    ex = base.example(ctx.model, window_BxL1)
    h = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)[
        'tower_states_NxBxLxH'].astype(jnp.float32)
    w_BxL = ex['weights']
    return jnp.einsum('nblh,bl->nh', h, w_BxL), jnp.sum(w_BxL)
  return sums


def _mean_states(ctx: Context) -> jax.Array:
  """mu_NxH: each tower's final state averaged over the scored positions."""
  sums = state_sums_fn(ctx)
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
      return base.target_log_probs(out['logits_BxLxV'], ex['targets'])
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


base.register('ablation', Estimator(
    prepare=_mean_states, values=_ablation_values,
    description='mean drop in log-likelihood of the item when that tower is replaced by its mean',
    skip_reason=lambda c: 'needs at least two towers' if c.model.n_towers < 2 else None))
