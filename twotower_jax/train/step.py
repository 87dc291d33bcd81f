"""Pure train and eval steps; `train.py` jits them with explicit shardings.

Per-step randomness is fold_in(state.rng, state.step), so a resumed run draws the
same dropout and masks as an uninterrupted one. With grad_accum_steps=k the global
batch is split into k micro-batches inside the step (lax.scan) and the gradients
are summed with the loss normalised by the whole batch's token weight, so the
update equals one large-batch update (dropout keys differ per micro-batch).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import embeddings
from twotower_jax.model import towers
from twotower_jax.train import nonfinite
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train.state import TrainState


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
            dropout_rng: jax.Array, perturbations: Any = None,
            total_weight: jax.Array | None = None,
            aux_scale: float = 1.0, loss_chunk: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CE normalised by `total_weight` (default: this batch's weight) plus scaled aux loss.

  `perturbations` (zeros) expose activation gradients, e.g. of the embedding lookup.
  `loss_chunk` (train.loss_chunk) > 0: the CE from the output layer's input in chunks of
  rows where the gate allows it (TwoTowerLM's `loss_sum`), else from the logits.
  """
  variables = {'params': params}
  if perturbations is not None:
    variables['perturbations'] = perturbations
  out = model.apply(variables, example['inputs'], weights_BxL=example['weights'],
                    deterministic=False, rngs={'dropout': dropout_rng},
                    targets_BxL=example['targets'], loss_chunk=loss_chunk)
  if 'loss_sum' in out:
    loss_sum, weight_sum = out['loss_sum'], jnp.sum(example['weights'])
  else:
    loss_sum, weight_sum = cross_entropy(out['logits_BxLxV'], example['targets'],
                                         example['weights'])
  ce = loss_sum / jnp.maximum(weight_sum if total_weight is None else total_weight, 1.0)
  loss = ce + aux_scale * out['aux_loss']
  return loss, {'ce': ce, 'aux_loss': out['aux_loss'], 'n_tokens': weight_sum,
                **out['metrics']}


def zero_perturbations(model: nn.Module, params: Any, inputs_BxL: jax.Array) -> Any:
  """Zeros shaped like the model's `perturbations` collection (e.g. the embedding lookup)."""
  _, shapes = jax.eval_shape(
      lambda p, x: model.apply({'params': p}, x, mutable=['perturbations']), params, inputs_BxL)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])


def grads_and_lookup(params: Any, model: nn.Module, example: dict[str, jax.Array],
                     dropout_rng: jax.Array, total_weight: jax.Array | None = None,
                     aux_scale: float = 1.0,
                     loss_chunk: int = 0) -> tuple[jax.Array, dict, Any, jax.Array]:
  """(loss, aux, grads, table gradient through the input lookup) of one batch."""
  perturbations = zero_perturbations(model, params, example['inputs'])
  (loss, aux), (grads, pert_grads) = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)(
      params, model, example, dropout_rng, perturbations, total_weight, aux_scale, loss_chunk)
  lookup_part = embeddings.lookup_table_grad(model.cfg, grads['embed']['token'],
                                             pert_grads['embed']['lookup'], example['inputs'])
  return loss, aux, grads, lookup_part


def split_micro(x_BxD: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...]; micro-batch i takes rows i, i+k, ... so every
  micro-batch stays spread over all data-parallel devices."""
  b = x_BxD.shape[0]
  return jnp.swapaxes(x_BxD.reshape((b // k, k) + x_BxD.shape[1:]), 0, 1)


# How each loss_fn metric combines over micro-batches (default: mean).
_SUMMED = ('ce', 'n_tokens')


def accumulated_grads(params: Any, model: nn.Module, example: dict[str, jax.Array],
                      dropout_rng: jax.Array, k: int,
                      loss_chunk: int = 0) -> tuple[jax.Array, dict, Any, jax.Array]:
  """grads_and_lookup of the whole batch from k scanned micro-batches.

  Each micro-batch's CE is divided by the whole batch's token weight, so the summed
  gradient is the large-batch gradient; the aux loss is the micro-batch mean.
  """
  total_weight = jnp.sum(example['weights'])
  micro = jax.tree.map(lambda x: split_micro(x, k), example)

  def body(acc, xs):
    i, ex = xs
    loss, aux, grads, lookup_part = grads_and_lookup(
        params, model, ex, jax.random.fold_in(dropout_rng, i), total_weight, 1.0 / k, loss_chunk)
    return jax.tree.map(jnp.add, acc, (grads, lookup_part)), (loss, aux)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grads, lookup_part), (losses_K, aux_K) = lax.scan(
      body, (zeros, jnp.zeros_like(zeros['embed']['token'])), (jnp.arange(k), micro))
  aux = {name: jnp.sum(v, 0) if name in _SUMMED else jnp.mean(v, 0) for name, v in aux_K.items()}
  return jnp.sum(losses_K), aux, grads, lookup_part


def weight_targets(example: dict[str, jax.Array],
                   target_weights_V: jax.Array | None) -> dict[str, jax.Array]:
  """The example with each target's loss weight multiplied by w_V[target] (None: as is)."""
  if target_weights_V is None:
    return example
  return dict(example, weights=example['weights'] * target_weights_V[example['targets']])


def train_step(state: TrainState, window_BxL1: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
               grad_accum_steps: int = 1, on_nonfinite: str = 'stop',
               target_weights_V: jax.Array | None = None,
               trainable: str = '', loss_chunk: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on one global batch of packed windows (optionally accumulated).

  metrics[nonfinite.FLAGS_KEY] flags the loss, each gradient leaf, each updated parameter
  leaf and the updated optimizer state as finite; with on_nonfinite='skip' a step with
  any of them non-finite keeps the old params and optimizer state.
  `target_weights_V` (the data source's, e.g. data.planted_loss_class) scales each
  target's loss weight. With `trainable` (train.trainable) the frozen parameters'
  gradients are zeros here already, so XLA drops their backward pass (and the metrics
  count only the trained ones); the optimizer zeroes them as well. `loss_chunk`: see loss_fn.
  """
  dropout_rng, example_rng = step_rngs(state)
  example = towers.get(model.cfg.tower_type).make_example(window_BxL1, example_rng, model.cfg)
  example = weight_targets(example, target_weights_V)
  if grad_accum_steps > 1:
    loss, aux, grads, lookup_part = accumulated_grads(state.params, model, example, dropout_rng,
                                                      grad_accum_steps, loss_chunk)
  else:
    loss, aux, grads, lookup_part = grads_and_lookup(state.params, model, example, dropout_rng,
                                                     loss_chunk=loss_chunk)
  if trainable:
    grads = optimizer_lib.zero_frozen(grads, trainable)
    if not optimizer_lib.selects(trainable, 'embed/token'):
      lookup_part = jnp.zeros_like(lookup_part)
  aux.update(embeddings.grad_norm_metrics(grads, lookup_part))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite, flags_Q = nonfinite.flags(loss, grads, params, opt_state)
  skipped = jnp.zeros((), jnp.float32)
  if on_nonfinite == 'skip':
    params = nonfinite.keep_if_finite(finite, params, state.params)
    opt_state = nonfinite.keep_if_finite(finite, opt_state, state.opt_state)
    skipped = 1.0 - finite.astype(jnp.float32)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'lr': lr_schedule(state.step), 'skipped': skipped,
             nonfinite.FLAGS_KEY: flags_Q, **aux}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, window_BxL1: jax.Array, batch_index: jax.Array = 0, *,
              model: nn.Module, target_weights_V: jax.Array | None = None,
              bytes_V: jax.Array | None = None) -> dict[str, jax.Array]:
  """Summed loss and weight, dropout off; masks (if any) from eval batch `batch_index`'s own
  fixed key (fold_in(PRNGKey(0), batch_index): the same at every eval, different per batch).

  Fill rows (all PAD; a real window starts with a corpus token) are never scored, whatever
  the PAD target switches say. With `target_weights_V` the loss is over the weighted
  targets (what the run trains on) and `loss_sum_all`/`weight_sum_all` over every target.
  With `bytes_V` (the text bytes of each piece) `bytes_sum` is the bytes of the loss's
  targets, for bits per byte.
  """
  example = towers.get(model.cfg.tower_type).make_example(
      window_BxL1, jax.random.fold_in(jax.random.PRNGKey(0), batch_index), model.cfg)
  real_B = (window_BxL1[:, 0] != tokenizer_lib.PAD_ID).astype(example['weights'].dtype)
  example = dict(example, weights=example['weights'] * real_B[:, None])
  weighted = weight_targets(example, target_weights_V)
  out = model.apply({'params': params}, example['inputs'], weights_BxL=weighted['weights'],
                    deterministic=True)
  loss_sum, weight_sum = cross_entropy(out['logits_BxLxV'], example['targets'],
                                       weighted['weights'])
  result = {'loss_sum': loss_sum, 'weight_sum': weight_sum}
  if bytes_V is not None:
    result['bytes_sum'] = jnp.sum(weighted['weights'] * bytes_V[example['targets']])
  if target_weights_V is not None:
    result['loss_sum_all'], result['weight_sum_all'] = cross_entropy(
        out['logits_BxLxV'], example['targets'], example['weights'])
  return result
