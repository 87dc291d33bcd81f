"""Tower types: one tower maps embedded inputs x_BxLxH to final states h_BxLxH.

A tower type pairs a Flax module with its objective: `make_example` turns a packed
window of L+1 tokens into inputs, targets and loss weights (PAD weights are zero).
Register a new type with `register`; the model and the train step look it up by
`config.model.tower_type` and never change.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax import layers
from twotower_jax import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class TowerType:
  module: type[nn.Module]  # fields (cfg, deterministic); __call__(x_BxLxH) -> h_BxLxH
  make_example: Callable[..., dict[str, jax.Array]]  # (window_BxL1, rng, cfg) -> example


TOWER_TYPES: dict[str, TowerType] = {}


def register(name: str, module: type[nn.Module], make_example: Callable[..., dict]) -> None:
  TOWER_TYPES[name] = TowerType(module, make_example)


def get(name: str) -> TowerType:
  if name not in TOWER_TYPES:
    raise KeyError(f'model.tower_type={name!r} is unknown; choose one of {sorted(TOWER_TYPES)}')
  return TOWER_TYPES[name]


class TransformerBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  cfg: layers.ModelConfig
  causal: bool
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array, _=None):
    cfg = self.cfg
    h_BxLxH = layers.layer_norm(name='ln_attn')(x_BxLxH)
    qkv = nn.DenseGeneral(
        (3, cfg.n_heads, cfg.head_dim), name='qkv',
        kernel_init=layers.param_init(('embed', None, 'heads', 'kv')),
        bias_init=layers.zeros_init((None, 'heads', 'kv')), dtype=cfg.compute_dtype)(h_BxLxH)
    q_BxLxNxD, k_BxLxNxD, v_BxLxNxD = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y_BxLxNxD = jax.nn.dot_product_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD,
                                             is_causal=self.causal)
    y_BxLxH = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), name='attn_out',
        kernel_init=layers.param_init(('heads', 'kv', 'embed'),
                                      layers.INIT_STD / (2 * cfg.n_layers) ** 0.5),
        bias_init=layers.zeros_init(('embed',)), dtype=cfg.compute_dtype)(y_BxLxNxD)
    x_BxLxH = x_BxLxH + nn.Dropout(cfg.dropout)(y_BxLxH, deterministic=self.deterministic)

    h_BxLxH = layers.layer_norm(name='ln_mlp')(x_BxLxH)
    h_BxLxF = layers.gelu(layers.dense(cfg.d_mlp, ('embed', 'mlp'), name='mlp_in',
                                            dtype=cfg.compute_dtype)(h_BxLxH))
    h_BxLxH = layers.dense(cfg.d_model, ('mlp', 'embed'), name='mlp_out',
                           std=layers.INIT_STD / (2 * cfg.n_layers) ** 0.5,
                           dtype=cfg.compute_dtype)(h_BxLxF)
    x_BxLxH = x_BxLxH + nn.Dropout(cfg.dropout)(h_BxLxH, deterministic=self.deterministic)
    self.sow('intermediates', 'block_out', x_BxLxH)  # analysis: per-layer states
    return x_BxLxH, None


class Transformer(nn.Module):
  """A stack of pre-LN blocks and a final LayerNorm (GPT-2 layout)."""
  cfg: layers.ModelConfig
  deterministic: bool
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
    cfg = self.cfg
    x_BxLxH = nn.Dropout(cfg.dropout)(x_BxLxH, deterministic=self.deterministic)
    self.sow('intermediates', 'tower_in', x_BxLxH)  # analysis: the layer-0 states
    block_cls = TransformerBlock
    if cfg.remat:  # recompute the block's activations in the backward pass
      block_cls = nn.remat(TransformerBlock, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      blocks = nn.scan(block_cls, variable_axes={'params': 0, 'intermediates': 0},
                       split_rngs={'params': True, 'dropout': True}, length=cfg.n_layers,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxLxH, _ = blocks(cfg, self.causal, self.deterministic, name='blocks')(x_BxLxH)
    else:
      for i in range(cfg.n_layers):
        x_BxLxH, _ = block_cls(cfg, self.causal, self.deterministic,
                          name=f'block_{i}')(x_BxLxH)
    return layers.layer_norm(name='ln_final')(x_BxLxH)


def causal_example(window_BxL1: jax.Array, rng: jax.Array, cfg: layers.ModelConfig):
  """Next-token prediction: inputs are tokens < t, the target is token t."""
  del rng, cfg
  targets_BxL = window_BxL1[:, 1:]
  return {'inputs': window_BxL1[:, :-1], 'targets': targets_BxL,
          'weights': (targets_BxL != tokenizer_lib.PAD_ID).astype(jnp.float32)}


register('causal', Transformer, causal_example)
