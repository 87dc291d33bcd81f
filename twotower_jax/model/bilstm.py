"""The `bilstm` tower type (ELMo): forward and backward LSTM stacks per tower.

Target t is token t itself and h_t = LN(Dense([fwd_{t-1}; bwd_{t+1}])), so position t
sees tokens < t through the forward stream and tokens > t through the backward
stream, never token t (zeros stand in for fwd_{-1} and bwd_L). Each stack has
n_layers LSTM layers of width H; `scan_layers` and `remat` do not apply, and
pondering is refused (its feedback would leak token t through the neighbours). For
the structural probe, layer i's state is ELMo's [fwd_i; bwd_i] (width 2H, sown as
`layer_i`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax.model import layers
from twotower_jax.model import towers


def _lstm_stack(cfg: layers.ModelConfig, x_BxLxH: jax.Array, reverse: bool, deterministic: bool,
                name: str) -> list[jax.Array]:
  """n_layers LSTM layers of width H in one direction: each layer's output, in input order."""
  init = lambda base, names: nn.with_logical_partitioning(base, names)
  outputs = []
  for i in range(cfg.n_layers):
    cell = nn.LSTMCell(
        cfg.d_model, dtype=layers.compute_dtype(cfg),
        kernel_init=init(nn.initializers.lecun_normal(), ('embed', 'mlp')),
        recurrent_kernel_init=init(layers.orthogonal_init(), ('embed', 'mlp')),
        bias_init=init(nn.initializers.zeros_init(), ('mlp',)), name=f'{name}_{i}')
    y_BxLxH = nn.RNN(cell, reverse=reverse, keep_order=True, name=f'{name}_rnn_{i}')(x_BxLxH)
    y_BxLxH = nn.Dropout(cfg.dropout)(y_BxLxH, deterministic=deterministic)
    x_BxLxH = y_BxLxH if i == 0 else x_BxLxH + y_BxLxH  # residual above the first layer
    outputs.append(x_BxLxH)
  return outputs


def anti_identity_diagonal(length: int) -> jax.Array:
  """d_L: the diagonal of the L x L anti-identity (1 only where t = L-1-t). The original's
  flip_seq multiplies the backward stream by it (einsum 'bwl,ww->bwl'), meaning to flip
  the stream back; it zeroes it instead (model.released.zero_backward)."""
  t_L = jnp.arange(length)
  return (t_L == length - 1 - t_L).astype(jnp.float32)


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
    if cfg.released.zero_backward:  # as released: only an odd window's middle survives
      future_BxLxH = future_BxLxH * anti_identity_diagonal(future_BxLxH.shape[1])[:, None]
    h_BxLxH = layers.dense(cfg.d_model, ('mlp', 'embed'), name='join',
                           dtype=layers.compute_dtype(cfg))(
                               jnp.concatenate([past_BxLxH, future_BxLxH], axis=-1))
    return layers.layer_norm(name='ln_final')(h_BxLxH)


def bilstm_example(window_BxL1: jax.Array, rng: jax.Array, cfg: layers.ModelConfig):
  """Every token 0..L-1 is a target, predicted from both sides of it (not from itself)."""
  del rng
  tokens_BxL = window_BxL1[:, :-1]
  return {'inputs': tokens_BxL, 'targets': tokens_BxL,
          'weights': towers.target_weights(tokens_BxL, cfg)}


towers.register('bilstm', BiLSTM, bilstm_example, paper_embedding_mode='projected',
                allows_pondering=False, backward_stream=True)
