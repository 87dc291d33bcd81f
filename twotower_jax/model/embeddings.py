"""Token tables: how the towers read tokens and how the output layer maps back to them.

`model.embedding.mode`:
- `shared` (GPT variant of the paper): one V x H token table and one position
  table, read directly by every tower.
- `projected` (BERT/ELMo variant): one V x (N*H) token table (and N*H wide
  position table); tower k reads it through its own linear projection to H. The
  tied output layer maps a gate output z (width H) back through a learned H -> N*H
  projection: logits = (z W_up) E^T + b.
- `per_tower`: tower k has its own V x H token and position tables. The tied joint
  output layer (the `concat` gate) uses the mean of the N token tables; per-tower
  output distributions (`latent`, `logit_sum`) use tower k's own table.

`model.embedding.tied=False` adds a separate V x H output matrix (no up-projection).
`model.head.width='table'` (original BERT/ELMo head) drops the up-projection: the gate's
head then outputs N*H features, scored against the table directly (`output_width`).
`model.embedding.ln` (projected only) normalises the looked-up row (token plus position)
with a LayerNorm of width N*H, eps 1e-12, before the per-tower projections: `shared` one
(`ln_emb`, BERT's layer_norm_emb); `per_direction` two (`ln_emb_fwd`, `ln_emb_bwd`, ELMo's
layer_norm_embf/embb), each projected by tower k's own projection, so tower k reads the
forward and backward streams' inputs concatenated, x_NxBxLx2H (bilstm splits them).
`model.embedding.positions=False` has no position table (ELMo).
`model.embedding.proj_init='torch_linear'` makes the projections the original's nn.Linear:
torch's uniform init and a per-tower bias (`in_proj_bias`); `model.embedding.dropout_at=
'row'` moves the input dropout from each tower's input to the (normalised) row before
them, one mask shared by the towers (per stream with two LayerNorms), as the original.
`model.embedding.input_grad_scale` s scales only the gradient that reaches the token
table through the input lookup: e = s*E[x] - (s-1)*stop_gradient(E[x]).

The looked-up rows are marked with `self.perturb('lookup', ...)`, so the train step
can split the table's gradient into the part arriving through the input lookup and
the rest (output layer, and pondering's soft embeddings): `grad_norm_metrics`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import layers
from twotower_jax.model import output_loss

MODES = ('shared', 'projected', 'per_tower')
# Choices of the projected mode's options, the first the default (and the only one the
# other modes take): model.embedding.proj_init and model.embedding.dropout_at.
PROJECTED_OPTIONS = {'proj_init': ('normal', 'torch_linear'), 'dropout_at': ('tower', 'row')}
EMB_LN_EPS = 1e-12  # the original's BertLayerNorm


def output_width(cfg: layers.ModelConfig) -> int:
  """Width of the joint head's output z: the table's N*H with model.head.width='table'
  (projected and tied: no out_proj), else d_model."""
  if cfg.head.width == 'table':
    return cfg.n_towers * cfg.d_model
  return cfg.d_model


def _has_out_proj(cfg: layers.ModelConfig) -> bool:
  return cfg.embedding.mode == 'projected' and cfg.embedding.tied and cfg.head.width == 'model'


def _ln_names(cfg: layers.ModelConfig) -> tuple[str, ...]:
  """The embedding LayerNorms of model.embedding.ln, one per input stream."""
  return {'none': (), 'shared': ('ln_emb',),
          'per_direction': ('ln_emb_fwd', 'ln_emb_bwd')}[cfg.embedding.ln]


def shift_rows(e_BxLxW: jax.Array, pad_W: jax.Array | None, s: int) -> jax.Array:
  """e moved s places later along its length axis (-2; s < 0: earlier), the |s| freed
  positions holding pad_W (leading axes of pad_W, if any, match e's: per-tower tables)."""
  if s == 0:
    return e_BxLxW
  pad = pad_W.reshape(pad_W.shape[:-1] + (1,) * (e_BxLxW.ndim - pad_W.ndim) + pad_W.shape[-1:])
  fill = jnp.broadcast_to(pad, e_BxLxW.shape[:-2] + (abs(s),) + e_BxLxW.shape[-1:])
  fill = fill.astype(e_BxLxW.dtype)
  if s > 0:
    return jnp.concatenate([fill, e_BxLxW[..., :-s, :]], axis=-2)
  return jnp.concatenate([e_BxLxW[..., -s:, :], fill], axis=-2)


def scale_input_grad(e: jax.Array, s: float) -> jax.Array:
  """Value e, gradient s * (incoming gradient); s=1 returns e untouched."""
  if s == 1.0:
    return e
  return s * e - (s - 1.0) * jax.lax.stop_gradient(e)


class Embedder(nn.Module):
  """encode: tokens -> per-tower inputs; decode: gate output -> vocabulary logits."""
  cfg: layers.ModelConfig

  def setup(self):
    cfg = self.cfg
    n, v, h = cfg.n_towers, cfg.vocab_size, cfg.d_model
    if cfg.embedding.mode == 'shared':
      self.token = self.param('token', layers.param_init(('vocab', 'embed')), (v, h))
      if cfg.embedding.positions:
        self.position = self.param('position', layers.param_init(('length', 'embed')),
                                   (cfg.max_len, h))
    elif cfg.embedding.mode == 'projected':
      self.token = self.param('token', layers.param_init(('vocab', 'embed')), (v, n * h))
      if cfg.embedding.positions:
        self.position = self.param('position', layers.param_init(('length', 'embed')),
                                   (cfg.max_len, n * h))
      names = ('tower', None, 'embed')
      if cfg.embedding.proj_init == 'torch_linear':  # the original's nn.Linear emb1/emb2
        kernel_init, bias_init = layers.torch_linear_init(names, fan_in=n * h,
                                                          bias_names=('tower', 'embed'))
        self.in_proj_NxWxH = self.param('in_proj', kernel_init, (n, n * h, h))
        self.in_bias_NxH = self.param('in_proj_bias', bias_init, (n, h))
      else:
        self.in_proj_NxWxH = self.param('in_proj', layers.param_init(names), (n, n * h, h))
      if _has_out_proj(cfg):
        self.out_proj_HxW = self.param('out_proj', layers.param_init((None, 'embed')),
                                       (h, n * h))
      self.emb_lns = [layers.layer_norm(name=name, eps=EMB_LN_EPS) for name in _ln_names(cfg)]
      self.row_dropout = nn.Dropout(cfg.dropout)  # embedding.dropout_at='row'
    elif cfg.embedding.mode == 'per_tower':
      self.token = self.param('token', layers.param_init(('tower', 'vocab', 'embed')), (n, v, h))
      if cfg.embedding.positions:
        self.position = self.param('position', layers.param_init(('tower', 'length', 'embed')),
                                   (n, cfg.max_len, h))
    else:
      raise ValueError(f'unknown embedding mode {cfg.embedding.mode!r}')
    if not cfg.embedding.tied:
      self.output_VxH = self.param('output', layers.param_init(('vocab', 'embed')), (v, h))
    self.output_bias_V = self.param('output_bias', layers.zeros_init(('vocab',)), (v,))

  def encode(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
             token_scale: float = 1.0, deterministic: bool = True,
             shifts: tuple[int, ...] | None = None) -> jax.Array:
    """x_NxBxLxH: each tower's embedded input. `positions_BxL` (decoding: each row's own
    positions, in [0, max_len)) defaults to 0..L-1 for every row. `token_scale` multiplies
    the token rows, not the positions (PonderingLM's sqrt(d) and steps weights).
    `deterministic=False` drops the row here with model.embedding.dropout_at='row'.
    `shifts` (the tower type's input_shifts): one input stream per offset s, the token rows
    moved s places later (PAD's row fills the gap) before positions, LayerNorm and
    projection; the streams come side by side (x_NxBxLx(S*H)). None: one unshifted stream
    per embedding LayerNorm (model.embedding.ln='per_direction': two), else one."""
    cfg = self.cfg
    if shifts is None:
      shifts = (0,) * max(1, len(getattr(self, 'emb_lns', ())))
    per_tower = cfg.embedding.mode == 'per_tower'
    e = jnp.take(self.token, tokens_BxL, axis=1 if per_tower else 0)  # [N]xBxLxW
    e = self.perturb('lookup', e)
    e = scale_input_grad(e, cfg.embedding.input_grad_scale)
    # PAD's row fills the shifted streams' ends (its gradient bypasses `lookup`).
    pad = scale_input_grad(self.token[..., tokenizer_lib.PAD_ID, :],
                           cfg.embedding.input_grad_scale) if any(shifts) else None
    if token_scale != 1.0:
      e = e * token_scale
      pad = None if pad is None else pad * token_scale
    streams = [shift_rows(e, pad, s) for s in shifts]
    if cfg.embedding.positions:
      length, axis = tokens_BxL.shape[1], 1 if per_tower else 0
      pos = (jnp.take(self.position, positions_BxL, axis=axis) if positions_BxL is not None
             else self.position[:, None, :length] if per_tower else self.position[:length])
      streams = [x + pos for x in streams]
    if cfg.embedding.mode == 'projected':
      if self.emb_lns:  # model.embedding.ln: 'shared' one norm for all, else one per stream
        if len(self.emb_lns) not in (1, len(streams)):
          raise ValueError(f'{len(self.emb_lns)} embedding LayerNorms for {len(streams)} '
                           'input streams')
        streams = [self.emb_lns[i % len(self.emb_lns)](x) for i, x in enumerate(streams)]
      if cfg.embedding.dropout_at == 'row':  # one mask per stream, shared by the towers
        streams = [self.row_dropout(x, deterministic=deterministic) for x in streams]
    return jnp.concatenate([self._to_towers(x) for x in streams], axis=-1)

  def soft_embed(self, probs: jax.Array, scale: float = 1.0) -> jax.Array:
    """Pondering input x_NxBxLxH: probability-weighted sum of the token rows (times `scale`),
    per tower. probs_BxLxV: one distribution for every tower; probs_NxBxLxV: tower k's own
    (model.pondering.per_tower)."""
    table = self.token if scale == 1.0 else self.token * scale
    mode, own = self.cfg.embedding.mode, probs.ndim == 4
    if mode == 'per_tower':
      return jnp.einsum('nblv,nvh->nblh' if own else 'blv,nvh->nblh', probs, table)
    if not own:
      return self._to_towers(probs @ table)
    e_NxBxLxW = jnp.einsum('nblv,vw->nblw', probs, table)
    if mode == 'projected':
      return self._projected(jnp.einsum('nblw,nwh->nblh', e_NxBxLxW, self.in_proj_NxWxH))
    return e_NxBxLxW

  def _to_towers(self, e_BxLxW: jax.Array) -> jax.Array:
    """x_NxBxLxH from a row's stream (per_tower: already each tower's own)."""
    if self.cfg.embedding.mode == 'per_tower':
      return e_BxLxW
    if self.cfg.embedding.mode == 'projected':
      return self._projected(jnp.einsum('blw,nwh->nblh', e_BxLxW, self.in_proj_NxWxH))
    return jnp.broadcast_to(e_BxLxW, (self.cfg.n_towers,) + e_BxLxW.shape)

  def _projected(self, x_NxBxLxH: jax.Array) -> jax.Array:
    """Tower k's projected input plus its bias (embedding.proj_init='torch_linear')."""
    if self.cfg.embedding.proj_init == 'torch_linear':
      return x_NxBxLxH + self.in_bias_NxH[:, None, None, :]
    return x_NxBxLxH

  def output_matrix(self) -> jax.Array:
    """The V x H matrix of the joint output layer (its rows score the vocabulary)."""
    cfg = self.cfg
    if not cfg.embedding.tied:
      return self.output_VxH
    if cfg.embedding.mode == 'per_tower':
      return jnp.mean(self.token, axis=0)
    return self.token  # projected: V x (N*H), reached through out_proj in decode

  def decode(self, z_BxLxH: jax.Array) -> jax.Array:
    """logits_BxLxV = z E^T + b (tied: the output layer is the input table)."""
    if _has_out_proj(self.cfg):  # else z is already table-wide (or the table H-wide)
      z_BxLxH = z_BxLxH @ self.out_proj_HxW
    return jnp.einsum('blh,vh->blv', z_BxLxH, self.output_matrix()) + self.output_bias_V

  def decode_loss(self, z_BxLxH: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                  chunk: int) -> jax.Array:
    """sum w * CE(decode(z), targets) in float32, `chunk` rows of logits at a time: the
    whole B x L x V logits are never formed (model/output_loss.py)."""
    if _has_out_proj(self.cfg):
      z_BxLxH = z_BxLxH @ self.out_proj_HxW
    return output_loss.batch_cross_entropy_sum(z_BxLxH, self.output_matrix(), self.output_bias_V,
                                               targets_BxL, weights_BxL, chunk)

  def decode_towers(self, z_NxBxLxH: jax.Array) -> jax.Array:
    """logits_NxBxLxV: tower k's head output through the output layer (its own table
    when tables are per tower and tied)."""
    if self.cfg.embedding.tied and self.cfg.embedding.mode == 'per_tower':
      return jnp.einsum('nblh,nvh->nblv', z_NxBxLxH, self.token) + self.output_bias_V
    return jax.vmap(self.decode)(z_NxBxLxH)


def lookup_table_grad(cfg: layers.ModelConfig, table: jax.Array, lookup_grads: jax.Array,
                      tokens_BxL: jax.Array) -> jax.Array:
  """The part of the token table's gradient that arrives through the input lookup.

  `lookup_grads` is the gradient wrt the `lookup` perturbation (the looked-up rows,
  already including the input_grad_scale factor); scatter-adding it by token id gives
  that part, shaped like `table`.
  """
  ids = tokens_BxL.reshape(-1)
  if cfg.embedding.mode == 'per_tower':
    g_NxBLxH = lookup_grads.reshape(table.shape[0], -1, table.shape[-1])
    return jax.vmap(lambda g: jnp.zeros(table.shape[1:], table.dtype).at[ids].add(g))(g_NxBLxH)
  return jnp.zeros_like(table).at[ids].add(lookup_grads.reshape(-1, table.shape[-1]))


def grad_norm_metrics(params_grads, input_part: jax.Array) -> dict[str, jax.Array]:
  """Norms of the token table's gradient through the input lookup and through the rest;
  untied, also of the output matrix's (the output side's gradient, which a tied table gets
  through the output layer)."""
  total = params_grads['embed']['token']
  out = {'embed_grad_norm_input': jnp.linalg.norm(input_part.reshape(-1)),
         'embed_grad_norm_output': jnp.linalg.norm((total - input_part).reshape(-1))}
  if 'output' in params_grads['embed']:
    out['embed_grad_norm_output_matrix'] = jnp.linalg.norm(
        params_grads['embed']['output'].reshape(-1))
  return out
