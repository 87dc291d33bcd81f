"""The token table E shared by the towers and tied to the output layer.

GPT variant of the paper: E is V x H, one token and one position table read
directly by every tower, and logits = z E^T + b.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax import layers


class Embedder(nn.Module):
  """encode: tokens -> per-tower inputs; decode: states -> vocabulary logits."""
  cfg: layers.ModelConfig

  def setup(self):
    cfg = self.cfg
    self.token_VxH = self.param('token', layers.param_init(('vocab', 'embed')),
                                (cfg.vocab_size, cfg.d_model))
    self.position_PxH = self.param('position', layers.param_init(('length', 'embed')),
                                   (cfg.max_len, cfg.d_model))
    self.output_bias_V = self.param('output_bias', layers.zeros_init(('vocab',)),
                                    (cfg.vocab_size,))

  def encode(self, tokens_BxL: jax.Array) -> jax.Array:
    """x_NxBxLxH: the same embedded input for every tower."""
    length = tokens_BxL.shape[1]
    x_BxLxH = jnp.take(self.token_VxH, tokens_BxL, axis=0) + self.position_PxH[:length]
    return jnp.broadcast_to(x_BxLxH, (self.cfg.n_towers,) + x_BxLxH.shape)

  def decode(self, z_BxLxH: jax.Array) -> jax.Array:
    """logits_BxLxV = z E^T + b (the output layer is the input table)."""
    return jnp.einsum('blh,vh->blv', z_BxLxH, self.token_VxH) + self.output_bias_V
