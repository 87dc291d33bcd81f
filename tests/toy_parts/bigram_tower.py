"""A toy tower type: each position sees only its own token (a bigram model), through an MLP."""

import flax.linen as nn
import jax

from twotower_jax.model import layers
from twotower_jax.model import towers
from twotower_jax.model import transformer


class BigramTower(nn.Module):
  cfg: layers.ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
    self.sow('intermediates', 'tower_in', x_BxLxH)
    h_BxLxF = layers.gelu(layers.dense(self.cfg.d_mlp, ('embed', 'mlp'), name='up')(x_BxLxH))
    self.sow('intermediates', 'layer_1', h_BxLxF[..., :self.cfg.d_model])
    h_BxLxH = layers.dense(self.cfg.d_model, ('mlp', 'embed'), name='down')(h_BxLxF)
    return layers.layer_norm(name='ln_final')(x_BxLxH + h_BxLxH)


towers.register('toy_bigram', BigramTower, transformer.causal_example, left_to_right=True)
