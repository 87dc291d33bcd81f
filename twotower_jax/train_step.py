"""Pure train and eval steps; `train.py` jits them with explicit shardings.

Per-step randomness is fold_in(state.rng, state.step), so a resumed run draws the
same dropout and masks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from twotower_jax import embeddings
from twotower_jax import nonfinite
from twotower_jax import towers
from twotower_jax.train_state import TrainState


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token losses, sum of weights), in float32."""
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)
  return jnp.sum(losses_BxL * weights_BxL), jnp.sum(weights_BxL)


def step_rngs(state: TrainState) -> tuple[jax.Array, jax.Array]:
  """(dropout key, example key) for this step."""
  dropout_rng, example_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  return dropout_rng, example_rng


def loss_fn(params: Any, model: nn.Module, example: dict[str, jax.Array],
            dropout_rng: jax.Array,
            perturbations: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean token loss + aux loss; `perturbations` (zeros) expose activation gradients."""
  variables = {'params': params}
  if perturbations is not None:
    variables['perturbations'] = perturbations
  out = model.apply(variables, example['inputs'], deterministic=False,
                    rngs={'dropout': dropout_rng})
  loss_sum, weight_sum = cross_entropy(out['logits_BxLxV'], example['targets'],
                                       example['weights'])
  ce = loss_sum / jnp.maximum(weight_sum, 1.0)
  loss = ce + out['aux_loss']
  return loss, {'ce': ce, 'aux_loss': out['aux_loss'], 'n_tokens': weight_sum,
                **out['metrics']}


def zero_perturbations(model: nn.Module, params: Any, inputs_BxL: jax.Array) -> Any:
  """Zeros shaped like the model's `perturbations` collection (e.g. the embedding lookup)."""
  _, shapes = jax.eval_shape(
      lambda p, x: model.apply({'params': p}, x, mutable=['perturbations']), params, inputs_BxL)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])


def train_step(state: TrainState, window_BxL1: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule,
               on_nonfinite: str = 'stop') -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on one global batch of packed windows.

  metrics[nonfinite.FLAGS_KEY] flags the loss and each gradient leaf as finite; with
  on_nonfinite='skip' a non-finite step keeps the old params and optimizer state.
  """
  dropout_rng, example_rng = step_rngs(state)
  example = towers.get(model.cfg.tower_type).make_example(window_BxL1, example_rng, model.cfg)
  perturbations = zero_perturbations(model, state.params, example['inputs'])
  (loss, aux), (grads, pert_grads) = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)(
      state.params, model, example, dropout_rng, perturbations)
  aux.update(embeddings.grad_norm_metrics(model.cfg, grads, pert_grads['embed']['lookup'],
                                          example['inputs']))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite, flags_Q = nonfinite.flags(loss, grads)
  skipped = jnp.zeros((), jnp.float32)
  if on_nonfinite == 'skip':
    params = nonfinite.keep_if_finite(finite, params, state.params)
    opt_state = nonfinite.keep_if_finite(finite, opt_state, state.opt_state)
    skipped = 1.0 - finite.astype(jnp.float32)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'lr': lr_schedule(state.step), 'skipped': skipped,
             nonfinite.FLAGS_KEY: flags_Q, **aux}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, window_BxL1: jax.Array, *, model: nn.Module) -> dict[str, jax.Array]:
  """Summed loss and weight, dropout off; masks (if any) from a fixed key."""
  example = towers.get(model.cfg.tower_type).make_example(
      window_BxL1, jax.random.PRNGKey(0), model.cfg)
  out = model.apply({'params': params}, example['inputs'], deterministic=True)
  loss_sum, weight_sum = cross_entropy(out['logits_BxLxV'], example['targets'],
                                       example['weights'])
  return {'loss_sum': loss_sum, 'weight_sum': weight_sum}
