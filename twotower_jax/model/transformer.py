"""Transformer towers: `causal` (GPT) and `mlm` (BERT), pre-LN blocks with a final LayerNorm
(`ln_final`; none with model.ln_final=False, as the original BERT towers).

- `causal`: inputs are tokens 0..L-1 of the window, target t is token t+1.
- `mlm`: a bidirectional stack on a corrupted copy of tokens 0..L-1; target t is the
  original token t, weighted only where it was selected. Masking is drawn from the
  step's example rng inside the jitted step (`mlm_example`).
The tower sows its input ('tower_in') and each block's output ('block_out') for the
structural probe.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import attention
from twotower_jax.model import layers
from twotower_jax.model import towers


def _rows(x_BxLxNxD: jax.Array) -> jax.Array:
  """x_MxLxD: one row per (batch row, head), M = B*N: the cache's leading axis."""
  b, l, n, d = x_BxLxNxD.shape
  return jnp.transpose(x_BxLxNxD, (0, 2, 1, 3)).reshape(b * n, l, d)


def cached_attention(q_BxLxNxD: jax.Array, k_MxDxT: jax.Array, v_MxTxD: jax.Array,
                     positions_BxL: jax.Array) -> jax.Array:
  """Each query at positions_BxL attends to the cached keys at positions <= its own.

  The arithmetic of jax.nn.dot_product_attention's XLA path (logits in at least f32,
  softmax in f32) on the cache's layout: one row per (batch row, head), M = B*N, keys
  stored transposed (DxT), so both matmuls read the cache as it lies.
  """
  b, l, n, d = q_BxLxNxD.shape
  logits_dtype = jnp.promote_types(q_BxLxNxD.dtype, jnp.float32)
  logits_MxLxT = jnp.einsum('mld,mdt->mlt', _rows(q_BxLxNxD), k_MxDxT,
                            preferred_element_type=logits_dtype)
  logits_MxLxT = logits_MxLxT * jnp.asarray(d ** -0.5, logits_dtype)
  positions_MxL = jnp.repeat(positions_BxL, n, axis=0)
  seen_MxLxT = jnp.arange(k_MxDxT.shape[2])[None, None, :] <= positions_MxL[:, :, None]
  logits_MxLxT = jnp.where(seen_MxLxT, logits_MxLxT, 0.7 * jnp.finfo(logits_dtype).min)
  probs_MxLxT = jax.nn.softmax(logits_MxLxT.astype(jnp.float32), axis=-1)
  y_MxLxD = jnp.einsum('mlt,mtd->mld', probs_MxLxT.astype(v_MxTxD.dtype), v_MxTxD)
  return jnp.transpose(y_MxLxD.reshape(b, n, l, d), (0, 2, 1, 3))


class TransformerBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  cfg: layers.ModelConfig
  causal: bool
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array, cache: dict[str, jax.Array] | None = None,
               positions_BxL: jax.Array | None = None, keep_BxL: jax.Array | None = None):
    """Returns (x_BxLxH, cache); `keep_BxL`: keys that may be attended to (None: all).
    With a decoding `cache` (k_MxDxT, v_MxTxD: M = B*N rows, one per batch row and head;
    T = max_len) the L inputs sit at `positions_BxL` of each row (in [0, T): the caller
    keeps them there): their keys and values are written there and each query attends to
    the cached keys at positions <= its own."""
    cfg = self.cfg
    h_BxLxH = layers.layer_norm(name='ln_attn')(x_BxLxH)
    qkv = nn.DenseGeneral(
        (3, cfg.n_heads, layers.head_dim(cfg)), name='qkv',
        kernel_init=layers.param_init(('embed', None, 'heads', 'kv')),
        bias_init=layers.zeros_init((None, 'heads', 'kv')), dtype=layers.compute_dtype(cfg))(h_BxLxH)
    qkv = layers.saved(qkv, 'qkv')
    q_BxLxNxD, k_BxLxNxD, v_BxLxNxD = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cache is None:
      probs_dropout = None
      if cfg.attention_dropout > 0 and not self.deterministic:  # model.attention_dropout
        probs_dropout = functools.partial(nn.Dropout(cfg.attention_dropout, name='attn_dropout'),
                                          deterministic=False)
      y_BxLxNxD = attention.attend(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, causal=self.causal,
                                   cfg=cfg, keep_BxL=keep_BxL, probs_dropout=probs_dropout)
      y_BxLxNxD = layers.saved(y_BxLxNxD, 'attention')
    else:
      # In-bounds writes let XLA update the loop-carried cache in place (no select, no copy).
      rows_Mx1 = jnp.arange(cache['k'].shape[0])[:, None]
      positions_MxL = jnp.repeat(positions_BxL, cfg.n_heads, axis=0)
      cache = {'k': cache['k'].at[rows_Mx1, :, positions_MxL].set(
                   _rows(k_BxLxNxD), mode='promise_in_bounds'),
               'v': cache['v'].at[rows_Mx1, positions_MxL].set(
                   _rows(v_BxLxNxD), mode='promise_in_bounds')}
      y_BxLxNxD = cached_attention(q_BxLxNxD, cache['k'], cache['v'], positions_BxL)
    y_BxLxH = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), name='attn_out',
        kernel_init=layers.param_init(('heads', 'kv', 'embed'), layers.residual_std(cfg)),
        bias_init=layers.zeros_init(('embed',)), dtype=layers.compute_dtype(cfg))(y_BxLxNxD)
    y_BxLxH = layers.saved(y_BxLxH, 'attn_out')
    x_BxLxH = x_BxLxH + nn.Dropout(cfg.dropout)(y_BxLxH, deterministic=self.deterministic)

    h_BxLxH = layers.layer_norm(name='ln_mlp')(x_BxLxH)
    h_BxLxF = layers.dense(cfg.d_mlp, ('embed', 'mlp'), name='mlp_in',
                           dtype=layers.compute_dtype(cfg))(h_BxLxH)
    h_BxLxF = layers.gelu(layers.saved(h_BxLxF, 'mlp_in'))
    h_BxLxH = layers.dense(cfg.d_model, ('mlp', 'embed'), name='mlp_out',
                           std=layers.residual_std(cfg),
                           dtype=layers.compute_dtype(cfg))(h_BxLxF)
    h_BxLxH = layers.saved(h_BxLxH, 'mlp_out')
    x_BxLxH = x_BxLxH + nn.Dropout(cfg.dropout)(h_BxLxH, deterministic=self.deterministic)
    self.sow('intermediates', 'block_out', x_BxLxH)  # analysis: per-layer states
    return x_BxLxH, cache


class Transformer(nn.Module):
  """A stack of pre-LN blocks and a final LayerNorm (GPT-2 layout; model.ln_final)."""
  cfg: layers.ModelConfig
  deterministic: bool
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array, cache: dict[str, jax.Array] | None = None,
               positions_BxL: jax.Array | None = None, keep_BxL: jax.Array | None = None):
    """h_BxLxH; `keep_BxL`: keys that may be attended to (model.released.mask_pad_keys).
    With a decoding `cache` (`causal_cache`) the inputs sit at `positions_BxL` and the
    result is (h_BxLxH, updated cache)."""
    cfg = self.cfg
    x_BxLxH = towers.input_dropout(cfg, x_BxLxH, self.deterministic)
    self.sow('intermediates', 'tower_in', x_BxLxH)  # analysis: the layer-0 states
    block_cls = TransformerBlock
    if cfg.remat:  # recompute the block's activations in the backward pass
      block_cls = layers.remat(TransformerBlock, cfg)
    if cfg.scan_layers:  # the cache is scanned along its layer axis, the positions broadcast
      blocks = nn.scan(block_cls, variable_axes={'params': 0, 'intermediates': 0},
                       split_rngs={'params': True, 'dropout': True}, length=cfg.n_layers,
                       in_axes=(0, nn.broadcast, nn.broadcast),
                       metadata_params={nn.PARTITION_NAME: 'layers'}, unroll=cfg.scan_unroll)
      x_BxLxH, new_cache = blocks(cfg, self.causal, self.deterministic, name='blocks')(
          x_BxLxH, cache, positions_BxL, keep_BxL)
    else:
      new_cache = None if cache is None else {}
      for i in range(cfg.n_layers):
        layer_cache = None if cache is None else {'k': cache[f'k_{i}'], 'v': cache[f'v_{i}']}
        x_BxLxH, layer_cache = block_cls(cfg, self.causal, self.deterministic,
                                         name=f'block_{i}')(x_BxLxH, layer_cache, positions_BxL,
                                                            keep_BxL)
        if cache is not None:
          new_cache.update({f'k_{i}': layer_cache['k'], f'v_{i}': layer_cache['v']})
    h_BxLxH = towers.final_norm(cfg, x_BxLxH)
    return h_BxLxH if cache is None else (h_BxLxH, new_cache)


def causal_cache(cfg: layers.ModelConfig, batch: int) -> dict[str, tuple]:
  """One causal tower's decoding cache: each layer's keys (MxDxT, stored transposed for the
  query-key matmul) and values (MxTxD) at all T = max_len positions, one row per batch row
  and head (M = batch * n_heads, batch-major: a one-row batch has no size-1 axis, which
  made XLA:CPU copy the cache every token). Laid out like the parameters: one array per
  layer (k_0, v_0, ...) when layers are unrolled, stacked on a layer axis (k, v) when
  scanned."""
  m, d, t = batch * cfg.n_heads, layers.head_dim(cfg), cfg.max_len
  k = ((m, d, t), ('batch', 'kv', 'length'))
  v = ((m, t, d), ('batch', 'length', 'kv'))
  if cfg.scan_layers:
    return {name: ((cfg.n_layers,) + shape, ('layers',) + axes)
            for name, (shape, axes) in (('k', k), ('v', v))}
  return {f'{name}_{i}': spec for i in range(cfg.n_layers) for name, spec in (('k', k), ('v', v))}


def block_states(inter: dict) -> dict[str, jax.Array]:
  """{'input', 'block_1'..'block_L'}: what the tower read and each block's output."""
  out = {'input': inter['tower_in'][0]} if 'tower_in' in inter else {}
  if 'blocks' in inter:  # scanned blocks: N x n_layers x B x L x H
    stacked = inter['blocks']['block_out'][0]
    for i in range(stacked.shape[1]):
      out[f'block_{i + 1}'] = stacked[:, i]
  for k in inter:
    if k.startswith('block_'):  # unrolled blocks block_0..: a submodule each
      out[f'block_{int(k[6:]) + 1}'] = inter[k]['block_out'][0]
  return out


def causal_example(window_BxL1: jax.Array, rng: jax.Array, cfg: layers.ModelConfig):
  """Next-token prediction: inputs are tokens < t, the target is token t."""
  del rng
  targets_BxL = window_BxL1[:, 1:]
  return {'inputs': window_BxL1[:, :-1], 'targets': targets_BxL,
          'weights': towers.target_weights(targets_BxL, cfg)}


towers.register('causal', Transformer, causal_example, layer_states=block_states,
                attention_layers=lambda cfg: cfg.n_layers, left_to_right=True,
                decode_cache=causal_cache)


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


# The original BERT variant (docs/FIDELITY.md B1-B3): LayerNorm on the embedding, a head as
# wide as the table (no out_proj), no final LayerNorm in the (DeepSpeed pre-LN) towers.
ORIGINAL_BERT = {'model.embedding.ln': 'shared', 'model.embedding.proj_init': 'torch_linear',
                 'model.embedding.dropout_at': 'row', 'model.head.width': 'table',
                 'model.ln_final': False}

towers.register('mlm', BidirectionalTransformer, mlm_example, paper_embedding_mode='projected',
                paper_fields=lambda size: dict(ORIGINAL_BERT),
                layer_states=block_states, attention_layers=lambda cfg: cfg.n_layers)
