"""Mixing gates: the only place the towers meet.

A gate maps the stacked tower states h_NxBxLxH and the output layer (`decode`,
z_BxLxH -> logits_BxLxV) to a dict with `logits_BxLxV` (log_softmax of it is the
model's next-token distribution) plus optional extras: `aux_loss` (added to the
loss), `metrics` (scalars to log) and per-tower arrays for the analysis.
Register a new gate with `register`; the train loop never changes.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax import layers

GATES: dict[str, type[nn.Module]] = {}


def register(name: str):
  def wrap(cls):
    GATES[name] = cls
    return cls
  return wrap


def get(name: str) -> type[nn.Module]:
  if name not in GATES:
    raise KeyError(f'model.gate={name!r} is unknown; choose one of {sorted(GATES)}')
  return GATES[name]


def concat_towers(h_NxBxLxH: jax.Array) -> jax.Array:
  """[h_1; ...; h_N] along the feature axis: BxLx(N*H)."""
  n, b, l, h = h_NxBxLxH.shape
  return jnp.transpose(h_NxBxLxH, (1, 2, 0, 3)).reshape(b, l, n * h)


@register('concat')
class ConcatGate(nn.Module):
  """The paper's head: z = LN(GELU(Dense(LN([h_1; ...; h_N])))), logits = z E^T + b.

  The first LayerNorm is joint over the concatenation, so the towers' scales
  compete for one normaliser.
  """
  cfg: layers.ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, h_NxBxLxH: jax.Array, decode: Callable[[jax.Array], jax.Array]):
    x_BxLxC = layers.layer_norm('gate_in', name='ln_in')(concat_towers(h_NxBxLxH))
    z_BxLxH = layers.gelu(layers.dense(self.cfg.d_model, ('gate_in', 'embed'),
                                       name='dense')(x_BxLxC))
    z_BxLxH = layers.layer_norm(name='ln_out')(z_BxLxH)
    return {'logits_BxLxV': decode(z_BxLxH)}
