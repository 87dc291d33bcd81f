"""The train state and its sharded creation.

The abstract state (shapes + NamedShardings, from `jax.eval_shape`) is computed
once; it is the `out_shardings` of the sharded init and the Orbax restore target,
so a checkpoint restores onto whatever mesh the current run uses.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2]: base key; step keys are fold_in(rng, step)


def _example_tokens(model) -> jax.Array:
  return jnp.zeros((1, model.cfg.max_len), jnp.int32)


def init(model: nn.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Unboxed, unsharded state (jit it with `out_shardings` to shard)."""
  rng = jax.random.PRNGKey(seed)
  params_rng, state_rng = jax.random.split(rng)
  params = nn.unbox(model.init({'params': params_rng}, _example_tokens(model))['params'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def param_logical_specs(model: nn.Module) -> Any:
  """Logical PartitionSpecs of the params, read from the init's axis metadata."""
  boxed = jax.eval_shape(
      lambda: model.init({'params': jax.random.PRNGKey(0)}, _example_tokens(model)))
  return nn.get_partition_spec(boxed)['params']


def shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
              axis_rules) -> TrainState:
  """NamedShardings for every leaf: params and their optimizer moments by rule."""
  param_sh = sharding_lib.logical_shardings(param_logical_specs(model), mesh, axis_rules)
  abstract = jax.eval_shape(functools.partial(init, model, tx, 0))
  replicated = sharding_lib.replicated(mesh)
  opt_sh = optax.tree_map_params(  # a frozen leaf's MaskedNode (train.trainable) stays
      tx, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, abstract.opt_state, param_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def abstract(model: nn.Module, tx: optax.GradientTransformation,
             state_shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings: the restore target."""
  shapes = jax.eval_shape(functools.partial(init, model, tx, 0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, state_shardings)


def create_sharded(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                   state_shardings: TrainState) -> TrainState:
  """Initialises each parameter directly on its devices (never whole on one)."""
  return jax.jit(functools.partial(init, model, tx, seed),
                 out_shardings=state_shardings)()


def legacy_target(config: ml_collections.ConfigDict,
                  abstract_of: Callable[[optax.GradientTransformation], TrainState]
                  ) -> tuple[TrainState, Callable[[TrainState], TrainState]] | None:
  """checkpoints.restore's `legacy`: the restore target `abstract_of(tx)` in the optimizer
  layout of older train.trainable checkpoints (optimizer.legacy) and the conversion to
  today's; None where the layout never changed."""
  tx = optimizer_lib.legacy(config)
  if tx is None:
    return None
  return abstract_of(tx), lambda s: s.replace(
      opt_state=optimizer_lib.from_legacy(s.opt_state, config))
