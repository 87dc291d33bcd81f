"""The ablation estimators: what each tower's states are worth to the model's prediction.

Per position and tower k: log p(target) of the full model minus log p(target) with tower
k's final states replaced, the gate and output layer run on the cached states.
- `ablation`: replaced by their mean over the scored positions (one fixed vector).
- `resample`: replaced by the same tower's states at other scored positions drawn at
  random (independently per position), averaged over `analysis.ablation_draws` draws:
  the tower's input is removed but its states stay on the distribution the gate saw.
For two towers both also write the exact two-player Shapley values of the
log-likelihood (`shapley_t0`, `shapley_t1`).

Mixture gates (`latent`): with `analysis.ablation_routing='fixed'` (default) the gate's
prior pi is computed from the unedited states and only the towers' own distributions see
the replacement, so the drop measures what tower k predicts, not the routing information
its states carry (a mean state misroutes the other tower's positions: docs/ANALYSIS.md,
known-answer check). 'edited' lets the replacement reach the prior too.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators.base import Context, Estimator
from twotower_jax.model import gates as gates_lib

POOL_SIZE = 16384  # scored positions kept as the pool `resample` draws replacement states from


def _weighted_states(ctx: Context):
  """(h_NxPxH of every scored position, their weights w_P), over all eval batches."""
  hs, ws = [], []
  for i, (window, h_NxBxLxH) in enumerate(zip(ctx.eval_batches, base.ensure_states(ctx))):
    ex = base.example(ctx.model, window, i)
    hs.append(h_NxBxLxH.reshape(h_NxBxLxH.shape[0], -1, h_NxBxLxH.shape[-1]))
    ws.append(ex['weights'].reshape(-1))
  return jnp.concatenate(hs, axis=1), jnp.concatenate(ws)


def _mean_states(ctx: Context) -> jax.Array:
  """mu_NxH: each tower's final state averaged over the scored positions."""
  h_NxPxH, w_P = _weighted_states(ctx)
  return jnp.einsum('nph,p->nh', h_NxPxH.astype(jnp.float32), w_P) / jnp.maximum(w_P.sum(), 1.0)


def _state_pool(ctx: Context) -> jax.Array:
  """pool_NxMxH: the towers' states at up to POOL_SIZE scored positions (chosen at random)."""
  h_NxPxH, w_P = _weighted_states(ctx)
  scored = np.flatnonzero(np.asarray(w_P) > 0)
  rng = np.random.default_rng(int(ctx.config.analysis.seed))
  keep = np.sort(rng.choice(scored, size=min(POOL_SIZE, scored.size), replace=False))
  return h_NxPxH[:, keep]


def _drops(ctx: Context, replace: Callable[[jax.Array, int, jax.Array], jax.Array], draws: int):
  """values fn: per tower, log-lik lost when `replace(h, k, key)` swaps in tower k's states."""
  n = ctx.model.cfg.n_towers
  fixed = (ctx.config.analysis.ablation_routing == 'fixed'
           and gates_lib.get(ctx.model.cfg.gate).mixture)

  def fn(params, prepared, ex, h_NxBxLxH, key):
    unedited = base.gate_outputs(ctx.model, params, ex, h_NxBxLxH)
    log_pi_NxBxL = unedited['gate_log_weights_NxBxL'] if fixed else None

    def ll(ablate, key):
      def edit(h):
        for k in range(n):
          if ablate[k]:
            h = h.at[k].set(replace(prepared, k, jax.random.fold_in(key, k), h[k]))
        return h
      out = base.gate_outputs(ctx.model, params, ex, h_NxBxLxH, edit)
      if log_pi_NxBxL is None:
        return base.target_log_probs(out['logits_BxLxV'], ex['targets'])
      # the routing of the unedited states, the towers' distributions of the edited ones
      mixed_BxLxV = gates_lib.mixture_log_probs(log_pi_NxBxL, out['tower_logits_NxBxLxV'])
      return base.target_log_probs(mixed_BxLxV, ex['targets'])

    def mean_ll(ablate):
      keys = jax.random.split(key, draws)
      return sum(ll(ablate, keys[d]) for d in range(draws)) / draws

    full = base.target_log_probs(unedited['logits_BxLxV'], ex['targets'])
    drop = [full - mean_ll([j == k for j in range(n)]) for k in range(n)]
    extras = {}
    if n == 2:  # exact two-player Shapley values of the log-likelihood
      none = mean_ll([True, True])
      only0, only1 = full - drop[1], full - drop[0]  # tower 1 replaced / tower 0 replaced
      extras['shapley_t0'] = 0.5 * ((only0 - none) + (full - only1))
      extras['shapley_t1'] = 0.5 * ((only1 - none) + (full - only0))
    return jnp.stack(drop), extras
  return fn


def _mean_replace(mu_NxH, k, key, h_BxLxH):
  del key
  return jnp.broadcast_to(mu_NxH[k].astype(h_BxLxH.dtype), h_BxLxH.shape)


def _resample_replace(pool_NxMxH, k, key, h_BxLxH):
  idx_BxL = jax.random.randint(key, h_BxLxH.shape[:2], 0, pool_NxMxH.shape[1])
  return pool_NxMxH[k][idx_BxL].astype(h_BxLxH.dtype)


def _needs_two(config) -> str | None:
  return 'needs at least two towers' if config.model.n_towers < 2 else None


base.register('ablation', Estimator(
    prepare=_mean_states, values=lambda ctx: _drops(ctx, _mean_replace, 1),
    description='mean drop in log-likelihood of the item when that tower is replaced by its mean',
    skip_reason=_needs_two))

base.register('resample', Estimator(
    prepare=_state_pool,
    values=lambda ctx: _drops(ctx, _resample_replace, int(ctx.config.analysis.ablation_draws)),
    description=('mean drop in log-likelihood of the item when that tower\'s states are replaced '
                 'by its states at random other positions'),
    skip_reason=_needs_two))
