"""The `gate` estimator: the latent gate's posterior of which tower produced each token.

r_{t,k} = pi_{t,k} p_k(x_t) / sum_j pi_{t,j} p_j(x_t) (gates.latent_posteriors), for
gates registered as a mixture (model.gate=latent). Per token r_0 - r_1 is a lean in
[-1, 1], which the token view shows token by token.
"""

from __future__ import annotations

from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators.base import Context, Estimator
from twotower_jax.model import gates


def _gate_values(ctx: Context):
  def fn(params, _, ex, h_NxBxLxH, key):
    del key
    out = base.gate_outputs(ctx.model, params, ex, h_NxBxLxH)
    r_NxBxL = gates.latent_posteriors(out['tower_logits_NxBxLxV'], out['gate_log_weights_NxBxL'],
                                      ex['targets'])
    return r_NxBxL, {}
  return fn


def _skip_reason(config) -> str | None:
  if gates.get(config.model.gate).mixture:
    return None
  return (f'needs a mixture gate with a per-token prior, e.g. model.gate=latent (this run: '
          f'{config.model.gate})')


base.register('gate', Estimator(
    prepare=lambda ctx: None, values=_gate_values,
    description='mean posterior responsibility of the tower for the item (latent gate)',
    skip_reason=_skip_reason, token_lean=True))
