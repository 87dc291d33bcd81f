"""Mixing gates: the only place the towers meet.

A gate is a Flax module with field `cfg` (and, if it uses dropout, `deterministic`: the
model sets it, False while training), called with the stacked tower states
h_NxBxLxH, the output layer (`decode`, z_BxLxH -> logits_BxLxV; `decode_towers`,
z_NxBxLxH -> logits_NxBxLxV, tower k through its own table where tables are per
tower) and the loss weights w_BxL (averages such as the gate's balance are over
the positions that carry loss). It returns a dict with `logits_BxLxV` (log_softmax
of it is the model's next-token distribution) plus optional extras: `aux_loss`
(added to the loss), `metrics` (scalars to log) and per-tower arrays for the
analysis (`tower_logits_NxBxLxV`; a `mixture` gate also `gate_log_weights_NxBxL`,
the log prior log pi_NxBxL of its per-token mixture; a gate whose logits are
`decode(z)` also `output_in_BxLxZ`, that z, so the train step's loss can skip forming
the logits). Register a new gate with
`@register(name)`; the model and the train loop never change.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from twotower_jax import config as config_lib
from twotower_jax.model import embeddings
from twotower_jax.model import layers

@dataclasses.dataclass(frozen=True)
class Gate:
  """A registered gate: its module, and whether it is a per-token mixture of the towers'
  own distributions (it returns tower_logits_NxBxLxV and gate_log_weights_NxBxL, so the
  posterior of which tower produced each token is defined: `latent_posteriors`)."""
  module: type[nn.Module]
  mixture: bool = False
  tower_logits: bool = False  # it returns tower_logits_NxBxLxV (pondering.per_tower reads it)
  # Its output head starts with a LayerNorm over [h_1; ...; h_N] whose parameters are the
  # gate's `ln_in` (`head_joint_ln`; analysis.probe_input='joint_ln' reads it).
  joint_ln: bool = False


GATES: dict[str, Gate] = {}


def register(name: str, mixture: bool = False, tower_logits: bool = False,
             joint_ln: bool = False):
  """Class decorator: `@register('name')` registers a gate module under model.gate=name
  (a mixture always returns tower logits)."""
  def wrap(cls):
    GATES[name] = Gate(cls, mixture, tower_logits or mixture, joint_ln)
    return cls
  return wrap


def get(name: str) -> Gate:
  if name not in GATES:
    raise config_lib.unknown_name('model.gate', name, GATES)
  return GATES[name]


def build(cfg: layers.ModelConfig, deterministic: bool = True, **kwargs) -> nn.Module:
  """The gate module of model.gate; `deterministic` reaches a gate that declares it."""
  module = get(cfg.gate).module
  if 'deterministic' in {f.name for f in dataclasses.fields(module)}:
    kwargs['deterministic'] = deterministic
  return module(cfg, **kwargs)


def weighted_mean(x_NxBxL: jax.Array, weights_BxL: jax.Array | None) -> jax.Array:
  """x_N: per tower, the mean over the positions that carry loss (all when weights is None)."""
  if weights_BxL is None:
    return x_NxBxL.reshape(x_NxBxL.shape[0], -1).mean(axis=1)
  w_BxL = weights_BxL.astype(jnp.float32)
  return jnp.einsum('nbl,bl->n', x_NxBxL, w_BxL) / jnp.maximum(jnp.sum(w_BxL), 1.0)


def concat_towers(h_NxBxLxH: jax.Array) -> jax.Array:
  """[h_1; ...; h_N] along the feature axis: BxLx(N*H)."""
  n, b, l, h = h_NxBxLxH.shape
  return jnp.transpose(h_NxBxLxH, (1, 2, 0, 3)).reshape(b, l, n * h)


def split_towers(x_BxLxC: jax.Array, n: int) -> jax.Array:
  """The inverse of `concat_towers`: BxLx(N*H) -> h_NxBxLxH."""
  b, l, c = x_BxLxC.shape
  return jnp.transpose(x_BxLxC.reshape(b, l, n, c // n), (2, 0, 1, 3))


def head_joint_ln(cfg: layers.ModelConfig, gate_params, h_NxBxLxH: jax.Array,
                  dropout_key: jax.Array | None = None) -> jax.Array:
  """Slice k of the head's first LayerNorm over [h_1; ...; h_N], for every k (NxBxLxH): the
  trained `ln_in` of a gate registered with joint_ln (the concat head), applied as the gate
  applies it; with a `dropout_key` and model.head.joint_ln_dropout, dropped as in training."""
  ln = layers.layer_norm('gate_in', eps=cfg.head.ln_eps)
  x_BxLxC = ln.apply({'params': gate_params['ln_in']}, concat_towers(h_NxBxLxH))
  if dropout_key is not None and cfg.head.joint_ln_dropout:
    x_BxLxC = nn.Dropout(cfg.dropout).apply({}, x_BxLxC, deterministic=False,
                                            rngs={'dropout': dropout_key})
  return split_towers(x_BxLxC, h_NxBxLxH.shape[0])


@register('concat', joint_ln=True)
class ConcatGate(nn.Module):
  """The paper's head: z = LN(GELU(Dense(LN([h_1; ...; h_N])))), logits = z E^T + b.

  The first LayerNorm is joint over the concatenation, so the towers' scales
  compete for one normaliser. model.head.* sets the norms' epsilon, the GELU form and the
  Dense init (docs/FIDELITY.md: the original GPT variant's values); head.width='table'
  makes z the token table's width Z = N*H, scored against it with no up-projection (the
  original BERT/ELMo head, FIDELITY.md B2); else Z = H. head.joint_ln_dropout drops the
  joint LayerNorm's output (model.dropout), as the original ELMo (FIDELITY.md B6). The towers' states may be wider
  than H (bilstm.join=False: 2H); C = N times their width.
  """
  cfg: layers.ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, h_NxBxLxH: jax.Array, decode: Callable[[jax.Array], jax.Array],
               decode_towers: Callable[[jax.Array], jax.Array] | None = None,
               weights_BxL: jax.Array | None = None):
    del decode_towers, weights_BxL
    head = self.cfg.head
    x_BxLxC = layers.layer_norm('gate_in', name='ln_in',
                                eps=head.ln_eps)(concat_towers(h_NxBxLxH))
    if head.joint_ln_dropout:  # the original ELMo's dropout after its joint LN
      x_BxLxC = nn.Dropout(self.cfg.dropout)(x_BxLxC, deterministic=self.deterministic)
    z_BxLxZ = layers.dense(embeddings.output_width(self.cfg), ('gate_in', 'embed'), name='dense',
                           init=head.init, fan_in=x_BxLxC.shape[-1])(x_BxLxC)
    z_BxLxZ = layers.layer_norm(name='ln_out', eps=head.ln_eps)(layers.gelu(z_BxLxZ, head.gelu))
    return {'logits_BxLxV': decode(z_BxLxZ), 'output_in_BxLxZ': z_BxLxZ}


class TowerHead(nn.Module):
  """Per-tower output head z = LN(GELU(Dense(h))), applied before the output layer
  (model.head.* as in ConcatGate)."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, h_BxLxH: jax.Array) -> jax.Array:
    head = self.cfg.head
    z_BxLxH = layers.dense(self.cfg.d_model, ('embed', 'mlp'), name='dense', init=head.init,
                           fan_in=h_BxLxH.shape[-1])(h_BxLxH)
    return layers.layer_norm(name='ln', eps=head.ln_eps)(layers.gelu(z_BxLxH, head.gelu))


def tower_heads(cfg: layers.ModelConfig, h_NxBxLxH: jax.Array, name: str = 'heads') -> jax.Array:
  """z_NxBxLxH: one independently initialised head per tower (stacked on the tower axis)."""
  stacked = nn.vmap(TowerHead, in_axes=0, out_axes=0, axis_size=cfg.n_towers,
                    variable_axes={'params': 0}, split_rngs={'params': True},
                    metadata_params={nn.PARTITION_NAME: 'tower'})
  return stacked(cfg, name=name)(h_NxBxLxH)


@register('latent', mixture=True)
class LatentGate(nn.Module):
  """Co-LLM latent gate: p(x_t) = sum_k pi_{t,k} p_k(x_t), pi_t = softmax(Dense(LN([h_1;..;h_N]))).

  Returns `logits_BxLxV` = logsumexp_k(log pi_k + log_softmax(tower_logits_k)), a
  normalised log-distribution, so softmax cross-entropy of it is exactly the
  mixture's negative log-likelihood. `aux_loss` = balance_weight * KL(mean gate ||
  uniform), a regulariser against collapse onto one tower; the mean gate (and the
  logged means and entropy) average over the positions that carry loss. With
  `latent.uniform_init` the prior's Dense starts at zero (pi uniform), so a model whose
  towers are identical stays exactly symmetric under swapping them.
  """
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, h_NxBxLxH: jax.Array, decode: Callable[[jax.Array], jax.Array],
               decode_towers: Callable[[jax.Array], jax.Array],
               weights_BxL: jax.Array | None = None):
    cfg = self.cfg
    n = cfg.n_towers
    tower_logits_NxBxLxV = decode_towers(tower_heads(cfg, h_NxBxLxH))
    x_BxLxC = layers.layer_norm('gate_in', name='ln_in',
                                eps=cfg.head.ln_eps)(concat_towers(h_NxBxLxH))
    std = 0.0 if cfg.latent.uniform_init else layers.INIT_STD  # 0: pi uniform at init
    gate_BxLxN = layers.dense(n, ('gate_in', None), name='gate', std=std)(x_BxLxC)
    log_pi_NxBxL = jnp.moveaxis(jax.nn.log_softmax(gate_BxLxN.astype(jnp.float32), -1), -1, 0)
    logits_BxLxV = mixture_log_probs(log_pi_NxBxL, tower_logits_NxBxLxV)
    pi_NxBxL = jnp.exp(log_pi_NxBxL)
    mean_pi_N = weighted_mean(pi_NxBxL, weights_BxL)
    entropy = weighted_mean(-jnp.sum(pi_NxBxL * log_pi_NxBxL, axis=0, keepdims=True),
                            weights_BxL)[0]
    kl_uniform = jnp.sum(mean_pi_N * (jnp.log(jnp.maximum(mean_pi_N, 1e-30)) + jnp.log(n)))
    metrics = {f'gate_mean_t{k}': mean_pi_N[k] for k in range(n)}
    metrics.update(gate_entropy=entropy, gate_kl_uniform=kl_uniform)
    return {'logits_BxLxV': logits_BxLxV, 'tower_logits_NxBxLxV': tower_logits_NxBxLxV,
            'gate_log_weights_NxBxL': log_pi_NxBxL, 'metrics': metrics,
            'aux_loss': cfg.latent.balance_weight * kl_uniform}


def mixture_log_probs(log_pi_NxBxL: jax.Array, tower_logits_NxBxLxV: jax.Array) -> jax.Array:
  """log p_BxLxV = logsumexp_k(log pi_k + log_softmax(tower logits_k)): the mixture."""
  log_p_NxBxLxV = jax.nn.log_softmax(tower_logits_NxBxLxV.astype(jnp.float32), -1)
  return jax.nn.logsumexp(log_pi_NxBxL[..., None] + log_p_NxBxLxV, axis=0)


def latent_posteriors(tower_logits_NxBxLxV: jax.Array, gate_log_weights_NxBxL: jax.Array,
                      targets_BxL: jax.Array) -> jax.Array:
  """r_NxBxL: posterior r_{t,k} = pi_{t,k} p_k(x_t) / sum_j pi_{t,j} p_j(x_t) of who produced x_t."""
  log_p_NxBxLxV = jax.nn.log_softmax(tower_logits_NxBxLxV.astype(jnp.float32), -1)
  idx = jnp.broadcast_to(targets_BxL[None, ..., None], log_p_NxBxLxV.shape[:-1] + (1,))
  log_joint_NxBxL = gate_log_weights_NxBxL + jnp.take_along_axis(log_p_NxBxLxV, idx, -1)[..., 0]
  return jnp.exp(log_joint_NxBxL - jax.nn.logsumexp(log_joint_NxBxL, axis=0, keepdims=True))


@register('logit_sum', tower_logits=True)
class LogitSumGate(nn.Module):
  """Product of experts: logits = sum_k decode(head_k(h_k)), so p is proportional to prod_k p_k."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, h_NxBxLxH: jax.Array, decode: Callable[[jax.Array], jax.Array],
               decode_towers: Callable[[jax.Array], jax.Array],
               weights_BxL: jax.Array | None = None):
    del weights_BxL
    tower_logits_NxBxLxV = decode_towers(tower_heads(self.cfg, h_NxBxLxH))
    return {'logits_BxLxV': jnp.sum(tower_logits_NxBxLxV, axis=0),
            'tower_logits_NxBxLxV': tower_logits_NxBxLxV}
