"""Activation sharding by logical axis names, bound only while a step is traced on a mesh.

Parameters carry logical names from their initialisers (layers.param_init); an
activation gets them with `constrain`. The train step (or any caller that runs the
model on a mesh) wraps its function in `with_rules`, which makes the mesh and the
rule table visible to `constrain` while tracing; outside it `constrain` is a no-op,
so the model also runs unsharded.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh


_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar('activation_rules',
                                                                 default=None)


def with_rules(fn: Callable, mesh: Mesh, axis_rules) -> Callable:
  """`fn` traced with the mesh and rules active, so `constrain` binds (else a no-op)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _ACTIVATION_RULES.set(tuple(axis_rules))
    try:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args, **kwargs)
    finally:
      _ACTIVATION_RULES.reset(token)
  return wrapped


def logical_spec(logical_names: tuple[str | None, ...]) -> jax.sharding.PartitionSpec | None:
  """The mesh PartitionSpec of logical axis names inside `with_rules` (else None)."""
  axis_rules = _ACTIVATION_RULES.get()
  if axis_rules is None or jax.sharding.get_abstract_mesh().empty:
    return None
  return nn.logical_to_mesh_axes(logical_names, axis_rules)


def mesh_axis(logical_name: str):
  """The mesh axis (or axes) a logical axis lives on inside `with_rules`; None outside or
  when the rules replicate it (e.g. the towers' vmap axis, for kernels run per shard)."""
  spec = logical_spec((logical_name,))
  return None if spec is None or not len(spec) else spec[0]


def constrain(x: jax.Array, logical_names: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation's sharding by logical axis names (inside `with_rules` only)."""
  spec = logical_spec(logical_names)
  if spec is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec)
