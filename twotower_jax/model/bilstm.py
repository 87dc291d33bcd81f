"""The `bilstm` tower type (ELMo): forward and backward LSTM stacks per tower.

Target t is token t itself and h_t = LN(Dense([fwd_{t-1}; bwd_{t+1}])), so position t
sees tokens < t through the forward stream and tokens > t through the backward
stream, never token t (zeros stand in for fwd_{-1} and bwd_L). Each stack has
n_layers LSTM layers of width H, residual above the first; `scan_layers` and `remat` do
not apply, and pondering is refused (its feedback would leak token t through the
neighbours). For the structural probe, layer i's state is ELMo's [fwd_i; bwd_i] (width
2 x the LSTM width, sown as `layer_i`).

The original ELMo towers (docs/FIDELITY.md B3, B4): `model.bilstm.hidden` G > 0 makes the
LSTMs G wide, each stack ending in a Dense G -> H (`{fwd,bwd}_h2o`, the original's h2o;
H = d_model is then the 256-wide interface); `model.bilstm.residual=False` stacks the
layers plainly (torch's multi-layer LSTM); `model.bilstm.join=False` drops the Dense, so
the tower's state is [fwd_{t-1}; bwd_{t+1}] itself (2H wide), and `model.ln_final=False`
the LayerNorm. With `model.embedding.ln='per_direction'` the input is the two streams'
inputs side by side (x_BxLx2H: the forward stack reads the first half, the backward
stack the second). `model.bilstm.input_shift` (FIDELITY.md B6) shifts those inputs instead
of the outputs: the forward stack reads PAD, x_0..x_{L-2} and the backward stack
x_1..x_{L-1}, PAD, and h_t reads [fwd_t; bwd_t], so the ends read the LSTMs' state after
PAD (not zeros); layer i's state at t then covers the tokens other than t.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax.model import layers
from twotower_jax.model import towers


def _lstm_stack(cfg: layers.ModelConfig, x_BxLxH: jax.Array, reverse: bool, deterministic: bool,
                name: str) -> tuple[list[jax.Array], jax.Array]:
  """n_layers LSTM layers of width G (model.bilstm.hidden, 0: H) in one direction: each
  layer's output x_BxLxG, in input order, and the stack's output y_BxLxH (the last layer's,
  through the h2o Dense G -> H when bilstm.hidden > 0)."""
  init = lambda base, names: nn.with_logical_partitioning(base, names)
  outputs = []
  for i in range(cfg.n_layers):
    cell = nn.LSTMCell(
        cfg.bilstm.hidden or cfg.d_model, dtype=layers.compute_dtype(cfg),
        kernel_init=init(nn.initializers.lecun_normal(), ('embed', 'mlp')),
        recurrent_kernel_init=init(layers.orthogonal_init(), ('embed', 'mlp')),
        bias_init=init(nn.initializers.zeros_init(), ('mlp',)), name=f'{name}_{i}')
    y_BxLxG = nn.RNN(cell, reverse=reverse, keep_order=True, name=f'{name}_rnn_{i}')(x_BxLxH)
    y_BxLxG = nn.Dropout(cfg.dropout)(y_BxLxG, deterministic=deterministic)
    residual = i > 0 and cfg.bilstm.residual  # above the first layer
    x_BxLxH = x_BxLxH + y_BxLxG if residual else y_BxLxG
    outputs.append(x_BxLxH)
  if not cfg.bilstm.hidden:
    return outputs, outputs[-1]
  return outputs, layers.dense(cfg.d_model, ('mlp', 'embed'), name=f'{name}_h2o',
                               dtype=layers.compute_dtype(cfg))(outputs[-1])


def anti_identity_diagonal(length: int) -> jax.Array:
  """d_L: the diagonal of the L x L anti-identity (1 only where t = L-1-t). The original's
  flip_seq multiplies the backward stream by it (einsum 'bwl,ww->bwl'), meaning to flip
  the stream back; it zeroes it instead (model.released.zero_backward)."""
  t_L = jnp.arange(length)
  return (t_L == length - 1 - t_L).astype(jnp.float32)


def input_shifts(cfg: layers.ModelConfig) -> tuple[int, ...]:
  """The streams the tower reads: (1, -1) with the original's input shift (forward stream
  token t-1, backward stream token t+1), (0, 0) for the two embedding LayerNorms, else one."""
  if cfg.bilstm.input_shift:
    return (1, -1)
  return (0, 0) if cfg.embedding.ln == 'per_direction' else (0,)


class BiLSTM(nn.Module):
  """ELMo-style tower: h_t = LN(Dense([fwd_{t-1}; bwd_{t+1}])) (see the module docstring;
  model.bilstm.*, model.ln_final select the original's parts)."""
  cfg: layers.ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
    cfg = self.cfg
    x_BxLxH = towers.input_dropout(cfg, x_BxLxH, self.deterministic)
    self.sow('intermediates', 'tower_in', x_BxLxH)
    x_fwd_BxLxH = x_bwd_BxLxH = x_BxLxH
    if len(input_shifts(cfg)) == 2:  # each stream's own (normalised, or shifted) input
      x_fwd_BxLxH, x_bwd_BxLxH = jnp.split(x_BxLxH, 2, axis=-1)
    fwds, fwd_BxLxH = _lstm_stack(cfg, x_fwd_BxLxH, False, self.deterministic, 'fwd')  # <= t
    bwds, bwd_BxLxH = _lstm_stack(cfg, x_bwd_BxLxH, True, self.deterministic, 'bwd')  # >= t
    for i, (f_BxLxG, b_BxLxG) in enumerate(zip(fwds, bwds)):  # analysis: ELMo layer states
      self.sow('intermediates', f'layer_{i + 1}', jnp.concatenate([f_BxLxG, b_BxLxG], axis=-1))
    self.sow('intermediates', 'fwd', fwd_BxLxH)
    self.sow('intermediates', 'bwd', bwd_BxLxH)
    if cfg.bilstm.input_shift:  # the inputs were shifted: fwd_t saw < t, bwd_t saw > t
      past_BxLxH, future_BxLxH = fwd_BxLxH, bwd_BxLxH
    else:  # shift by one so position t reads fwd_{t-1} and bwd_{t+1}: token t is unseen
      zero_Bx1xH = jnp.zeros_like(fwd_BxLxH[:, :1])
      past_BxLxH = jnp.concatenate([zero_Bx1xH, fwd_BxLxH[:, :-1]], axis=1)
      future_BxLxH = jnp.concatenate([bwd_BxLxH[:, 1:], zero_Bx1xH], axis=1)
    if cfg.released.zero_backward:  # as released: only an odd window's middle survives
      future_BxLxH = future_BxLxH * anti_identity_diagonal(future_BxLxH.shape[1])[:, None]
    h_BxLxS = jnp.concatenate([past_BxLxH, future_BxLxH], axis=-1)
    if cfg.bilstm.join:
      h_BxLxS = layers.dense(cfg.d_model, ('mlp', 'embed'), name='join',
                             dtype=layers.compute_dtype(cfg))(h_BxLxS)
    return towers.final_norm(cfg, h_BxLxS)


def bilstm_example(window_BxL1: jax.Array, rng: jax.Array, cfg: layers.ModelConfig):
  """Every token 0..L-1 is a target, predicted from both sides of it (not from itself)."""
  del rng
  tokens_BxL = window_BxL1[:, :-1]
  return {'inputs': tokens_BxL, 'targets': tokens_BxL,
          'weights': towers.target_weights(tokens_BxL, cfg)}


def original_elmo(size: str) -> dict:
  """The original ELMo variant's fields (docs/FIDELITY.md B1-B4): per tower and direction a
  2-layer LSTM of width 2048 (base) / 4096 (large) between 256-wide interfaces, no residual,
  no positions, one embedding LayerNorm per direction, the [fwd; bwd] states (no join, no
  final LayerNorm) read by a head as wide as the table. n_heads is unused (1 divides 256)."""
  return {'model.n_layers': 2, 'model.d_model': 256, 'model.n_heads': 1,
          'model.bilstm.hidden': {'base': 2048, 'large': 4096}[size],
          'model.bilstm.residual': False, 'model.bilstm.join': False,
          'model.embedding.ln': 'per_direction', 'model.embedding.positions': False,
          'model.embedding.proj_init': 'torch_linear', 'model.embedding.dropout_at': 'row',
          'model.head.width': 'table', 'model.ln_final': False,
          'model.bilstm.input_shift': True, 'model.head.joint_ln_dropout': True}


towers.register('bilstm', BiLSTM, bilstm_example, paper_embedding_mode='projected',
                paper_fields=original_elmo, allows_pondering=False, backward_stream=True,
                input_shifts=input_shifts,
                layer_states_see_target=lambda cfg: not cfg.bilstm.input_shift)
