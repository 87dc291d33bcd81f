"""A toy estimator: the log-likelihood lost when a tower's states are set to zero."""

import jax.numpy as jnp

from twotower_jax.analysis.estimators import base


def _values(ctx):
  n = ctx.model.cfg.n_towers

  def fn(params, _, ex, h_NxBxLxH, key):
    del key
    def ll(k):
      zero = None if k is None else (lambda h: h.at[k].set(0.0))
      out = base.gate_outputs(ctx.model, params, ex, h_NxBxLxH, zero)
      return base.target_log_probs(out['logits_BxLxV'], ex['targets'])
    full = ll(None)
    return jnp.stack([full - ll(k) for k in range(n)]), {}
  return fn


base.register('toy_zero', base.Estimator(
    prepare=lambda ctx: None, values=_values,
    description='mean drop in log-likelihood of the item when that tower is set to zero',
    skip_reason=lambda c: None if c.model.n_towers >= 2 else 'needs two towers'))
