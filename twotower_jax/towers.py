"""Tower types: one tower maps embedded inputs x_BxLxH to final states h_BxLxH.

A tower type pairs a Flax module with its objective: `make_example` turns a packed
window of L+1 tokens into inputs, targets and loss weights (PAD weights are zero).
Register a new type with `register`; the model and the train step look it up by
`config.model.tower_type` and never change. The state h_t feeds the gate, which
predicts `targets[t]`.

- `causal` (GPT): causal transformer; inputs are tokens 0..L-1, target t is token
  t+1 of the window.
- `mlm` (BERT): bidirectional transformer on a corrupted copy of tokens 0..L-1;
  target t is the original token t, weighted only where it was selected. Masking is
  drawn from the step's example rng inside the jitted step (`mlm_example`).
- `bilstm` (ELMo): per tower a forward LSTM stack over the inputs left to right and
  a separate backward stack right to left; target t is token t itself and
  h_t = LN(Dense([fwd_{t-1}; bwd_{t+1}])), so position t sees tokens < t through the
  forward stream and tokens > t through the backward stream, never token t (zeros
  stand in for fwd_{-1} and bwd_L). Each stack has n_layers LSTM layers of width H;
  `scan_layers` and `remat` do not apply. For the analysis, layer i's state is
  ELMo's [fwd_i; bwd_i] (width 2H, sown as `layer_i`).
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


class BidirectionalTransformer(Transformer):
  """The same stack with full (non-causal) attention, for the masked LM."""
  causal: bool = False


# BERT corruption: share of candidate positions selected, and of those the share
# replaced by [MASK] and by a random token (the rest stay unchanged).
MLM_SELECT, MLM_MASK, MLM_RANDOM = 0.15, 0.8, 0.1


def mlm_example(window_BxL1: jax.Array, rng: jax.Array, cfg: layers.ModelConfig):
  """BERT masking of tokens 0..L-1: each non-special token is selected with p=0.15;
  selected tokens become [MASK] (80%), a random non-special token (10%) or stay (10%).

  Special ids (tokenizer.SPECIAL_IDS: PAD, UNK, BOS, EOS, MASK) are never selected;
  the loss weight is 1 exactly at selected positions, whose target is the original.
  """
  tokens_BxL = window_BxL1[:, :-1]
  select_rng, kind_rng, random_rng = jax.random.split(rng, 3)
  candidate_BxL = ~jnp.isin(tokens_BxL, jnp.asarray(tokenizer_lib.SPECIAL_IDS))
  selected_BxL = candidate_BxL & jax.random.bernoulli(select_rng, MLM_SELECT, tokens_BxL.shape)
  u_BxL = jax.random.uniform(kind_rng, tokens_BxL.shape)
  # Special ids are 0..len(SPECIAL_IDS)-1, so random replacements are drawn above them.
  random_BxL = jax.random.randint(random_rng, tokens_BxL.shape, len(tokenizer_lib.SPECIAL_IDS),
                                  cfg.vocab_size, dtype=tokens_BxL.dtype)
  corrupted_BxL = jnp.where(u_BxL < MLM_MASK, tokenizer_lib.MASK_ID,
                            jnp.where(u_BxL < MLM_MASK + MLM_RANDOM, random_BxL, tokens_BxL))
  inputs_BxL = jnp.where(selected_BxL, corrupted_BxL, tokens_BxL)
  return {'inputs': inputs_BxL, 'targets': tokens_BxL,
          'weights': selected_BxL.astype(jnp.float32)}


register('mlm', BidirectionalTransformer, mlm_example)


def _lstm_stack(cfg: layers.ModelConfig, x_BxLxH: jax.Array, reverse: bool, deterministic: bool,
                name: str) -> list[jax.Array]:
  """n_layers LSTM layers of width H in one direction: each layer's output, in input order."""
  init = lambda base, names: nn.with_logical_partitioning(base, names)
  outputs = []
  for i in range(cfg.n_layers):
    cell = nn.LSTMCell(
        cfg.d_model, dtype=cfg.compute_dtype,
        kernel_init=init(nn.initializers.lecun_normal(), ('embed', 'mlp')),
        recurrent_kernel_init=init(layers.orthogonal_init(), ('embed', 'mlp')),
        bias_init=init(nn.initializers.zeros_init(), ('mlp',)), name=f'{name}_{i}')
    y_BxLxH = nn.RNN(cell, reverse=reverse, keep_order=True, name=f'{name}_rnn_{i}')(x_BxLxH)
    y_BxLxH = nn.Dropout(cfg.dropout)(y_BxLxH, deterministic=deterministic)
    x_BxLxH = y_BxLxH if i == 0 else x_BxLxH + y_BxLxH  # residual above the first layer
    outputs.append(x_BxLxH)
  return outputs


class BiLSTM(nn.Module):
  """ELMo-style tower: h_t = LN(Dense([fwd_{t-1}; bwd_{t+1}])) (see the module docstring)."""
  cfg: layers.ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
    cfg = self.cfg
    x_BxLxH = nn.Dropout(cfg.dropout)(x_BxLxH, deterministic=self.deterministic)
    self.sow('intermediates', 'tower_in', x_BxLxH)
    fwds = _lstm_stack(cfg, x_BxLxH, False, self.deterministic, 'fwd')  # sees tokens <= t
    bwds = _lstm_stack(cfg, x_BxLxH, True, self.deterministic, 'bwd')  # sees tokens >= t
    for i, (f_BxLxH, b_BxLxH) in enumerate(zip(fwds, bwds)):  # analysis: ELMo layer states
      self.sow('intermediates', f'layer_{i + 1}', jnp.concatenate([f_BxLxH, b_BxLxH], axis=-1))
    fwd_BxLxH, bwd_BxLxH = fwds[-1], bwds[-1]
    self.sow('intermediates', 'fwd', fwd_BxLxH)
    self.sow('intermediates', 'bwd', bwd_BxLxH)
    # Shift by one so position t reads fwd_{t-1} and bwd_{t+1}: token t itself is unseen.
    zero_Bx1xH = jnp.zeros_like(fwd_BxLxH[:, :1])
    past_BxLxH = jnp.concatenate([zero_Bx1xH, fwd_BxLxH[:, :-1]], axis=1)
    future_BxLxH = jnp.concatenate([bwd_BxLxH[:, 1:], zero_Bx1xH], axis=1)
    h_BxLxH = layers.dense(cfg.d_model, ('mlp', 'embed'), name='join',
                           dtype=cfg.compute_dtype)(
                               jnp.concatenate([past_BxLxH, future_BxLxH], axis=-1))
    return layers.layer_norm(name='ln_final')(h_BxLxH)


def bilstm_example(window_BxL1: jax.Array, rng: jax.Array, cfg: layers.ModelConfig):
  """Every token 0..L-1 is a target, predicted from both sides of it (not from itself)."""
  del rng, cfg
  tokens_BxL = window_BxL1[:, :-1]
  return {'inputs': tokens_BxL, 'targets': tokens_BxL,
          'weights': (tokens_BxL != tokenizer_lib.PAD_ID).astype(jnp.float32)}


register('bilstm', BiLSTM, bilstm_example)
