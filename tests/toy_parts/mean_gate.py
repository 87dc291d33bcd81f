"""A toy gate: the towers' states are averaged, then decoded through the output layer."""

import flax.linen as nn
import jax.numpy as jnp

from twotower_jax.model import gates
from twotower_jax.model import layers


@gates.register('toy_mean')
class MeanGate(nn.Module):
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, h_NxBxLxH, decode, decode_towers=None, weights_BxL=None):
    del decode_towers, weights_BxL
    z_BxLxH = layers.layer_norm(name='ln')(jnp.mean(h_NxBxLxH, axis=0))
    return {'logits_BxLxV': decode(z_BxLxH)}
