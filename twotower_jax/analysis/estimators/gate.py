"""The `gate` estimator: the latent gate's posterior of which tower produced each token.

r_{t,k} = pi_{t,k} p_k(x_t) / sum_j pi_{t,j} p_j(x_t) (gates.latent_posteriors), for
gates registered as a mixture (model.gate=latent). Per token r_0 - r_1 is a lean in
[-1, 1], which the token view shows token by token.

Co-LLM's argmax deferral (`generate --co_llm=argmax`: each token from the tower with the
largest prior pi_{t,k}) is scored alongside, as extras: `chosen_t{k}` (1 where tower k has
the largest prior: its mean is the share of tokens deferred to tower k) and `argmax_nll`
(-log p_k*(x_t) of that tower: its mean is the loss of the deferral rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators.base import Context, Estimator
from twotower_jax.model import gates


def _gate_values(ctx: Context):
  def fn(params, _, ex, h_NxBxLxH, key):
    del key
    out = base.gate_outputs(ctx.model, params, ex, h_NxBxLxH)
    log_pi_NxBxL = out['gate_log_weights_NxBxL']
    r_NxBxL = gates.latent_posteriors(out['tower_logits_NxBxLxV'], log_pi_NxBxL, ex['targets'])
    logp_NxBxL = jax.vmap(base.target_log_probs, in_axes=(0, None))(
        out['tower_logits_NxBxLxV'], ex['targets'])
    chosen_BxL = jnp.argmax(log_pi_NxBxL, axis=0)
    extras = {'argmax_nll': -jnp.take_along_axis(logp_NxBxL, chosen_BxL[None], 0)[0]}
    extras.update({f'chosen_t{k}': (chosen_BxL == k).astype(jnp.float32)
                   for k in range(log_pi_NxBxL.shape[0])})
    return r_NxBxL, extras
  return fn


def _skip_reason(config) -> str | None:
  if config.model.n_towers < 2:
    return 'one tower: nothing to defer to (the latent gate of one tower is that tower)'
  if gates.get(config.model.gate).mixture:
    return None
  return (f'needs a mixture gate with a per-token prior, e.g. model.gate=latent (this run: '
          f'{config.model.gate})')


base.register('gate', Estimator(
    prepare=lambda ctx: None, values=_gate_values,
    description='mean posterior responsibility of the tower for the item (latent gate)',
    skip_reason=_skip_reason, token_lean=True))
