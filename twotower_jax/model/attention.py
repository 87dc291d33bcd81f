"""Scaled dot-product attention with the implementation chosen for the platform.

`model.attention` picks it:
- `auto` (default): cuDNN flash attention when the step is lowered for a CUDA GPU and
  cuDNN can take the shapes (`cudnn_problem` is None: bfloat16, head dim a multiple of
  8 and at most 128); XLA's attention everywhere else (CPU, TPU, float32).
- `xla`: `jax.nn.dot_product_attention(implementation='xla')` on every platform.
- `cudnn`: cuDNN flash attention on CUDA; a config it cannot take is refused at
  validation instead of falling back. Other platforms have no cuDNN and use XLA.
- `splash`: the Pallas splash-attention kernel from JAX's TPU ops on TPU (window a
  multiple of 128; for long windows, where XLA's L x L scores dominate memory); XLA
  elsewhere, so a splash run is still read (analysed) on CPU.

The platform is the one the step is lowered for: `cfg.platform` when the model was
built for a target (`lm.build(..., platform='tpu')`, e.g. to `jax.export` a TPU step
on a CPU-only machine), else this process's default backend. Under a mesh the two
kernels run per shard (`shard_map` over the batch axes, the tower axis through the
towers' vmap), so XLA never has to partition an opaque kernel call.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from twotower_jax import config as config_lib
from twotower_jax.model import layers
from twotower_jax.model import partitioning

CHOICES = ('auto', 'xla', 'cudnn', 'splash')
SPLASH_BLOCK = 128  # the splash kernel's tiles are multiples of the TPU's 128 lanes
_HEAD_LOGICAL = ('batch', 'length', 'heads', 'kv')  # q, k, v and the output: B x L x N x D


def backend_platform() -> str:
  """This process's default platform as lowering names it: 'cpu', 'tpu', 'cuda' or 'rocm'."""
  backend = jax.default_backend()
  if backend == 'gpu':
    version = jax.devices()[0].client.platform_version.lower()
    return 'rocm' if 'rocm' in version else 'cuda'
  return backend


def cudnn_problem(cfg) -> str | None:
  """Why cuDNN flash attention cannot take this model (None: it can)."""
  d = cfg.d_model // cfg.n_heads
  if cfg.dtype != 'bfloat16':
    return f'model.dtype={cfg.dtype!r} (cuDNN flash attention needs bfloat16)'
  if d % 8 or d > 128:
    return f'head dim {d} = d_model/n_heads (cuDNN needs a multiple of 8, at most 128)'
  return None


def implementation(cfg: layers.ModelConfig, platform: str | None = None) -> str:
  """'xla', 'cudnn' or 'splash': what `attend` runs when lowered for `platform`."""
  platform = platform or cfg.get('platform') or backend_platform()
  choice = cfg.attention
  if needs_probs(cfg):  # the kernels take no key mask or probability dropout
    return 'xla'
  if platform == 'cuda' and choice in ('auto', 'cudnn') and cudnn_problem(cfg) is None:
    return 'cudnn'
  if platform == 'tpu' and choice == 'splash':
    return 'splash'
  return 'xla'


def needs_probs(cfg) -> bool:
  """Whether attention must form its probabilities itself: attention dropout or PAD key
  masking (model.attention_dropout, model.released.mask_pad_keys) is on."""
  return cfg.attention_dropout > 0 or cfg.released.mask_pad_keys


def check_config(config: ml_collections.ConfigDict) -> None:
  """model.attention names a choice, and a forced kernel can take the model's shapes."""
  m = config.model
  if m.attention not in CHOICES:
    raise config_lib.unknown_name('model.attention', m.attention, CHOICES)
  if m.attention in ('cudnn', 'splash') and needs_probs(m):
    raise config_lib.ConfigError(
        f"model.attention={m.attention!r} has no attention dropout or PAD key mask; use 'xla' "
        "or 'auto', or set model.attention_dropout=0 and model.released.mask_pad_keys=False")
  if m.attention == 'cudnn' and cudnn_problem(m):
    raise config_lib.ConfigError(f"model.attention='cudnn' cannot run {cudnn_problem(m)}; use "
                                 "'auto' (XLA where cuDNN cannot) or fix the shapes")
  if m.attention == 'splash' and config.data.seq_len % SPLASH_BLOCK:
    raise config_lib.ConfigError(
        f"model.attention='splash' needs data.seq_len a multiple of {SPLASH_BLOCK} (got "
        f"{config.data.seq_len}); use 'auto' for short windows")


_STAND_IN = contextvars.ContextVar('flash_stand_in', default=False)


@contextlib.contextmanager
def flash_stand_in():
  """While a step is traced inside, a flash kernel (cuDNN, splash) becomes XLA attention
  that keeps no score matrix for the backward pass (recomputed there, `jax.checkpoint`):
  a program XLA:CPU compiles whose memory resembles the kernel's (the dry run's estimate).
  """
  token = _STAND_IN.set(True)
  try:
    yield
  finally:
    _STAND_IN.reset(token)


def attend(q_BxLxNxD: jax.Array, k_BxLxNxD: jax.Array, v_BxLxNxD: jax.Array, *, causal: bool,
           cfg: layers.ModelConfig, keep_BxL: jax.Array | None = None,
           probs_dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head (causal: position t sees positions <= t).

  `keep_BxL` (bool): keys that may be attended to (the others get no weight);
  `probs_dropout`: applied to the probabilities. Either one takes `explicit_attention`.
  """
  if keep_BxL is not None or probs_dropout is not None:
    return explicit_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, causal, keep_BxL, probs_dropout)
  impl = implementation(cfg)
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                     implementation='xla')
  if impl == 'xla':
    return xla(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD)
  if _STAND_IN.get():
    return jax.checkpoint(xla)(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD)
  kernel = _cudnn if impl == 'cudnn' else _splash
  return _per_shard(lambda q, k, v: kernel(q, k, v, causal))(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD)


def explicit_attention(q_BxLxNxD: jax.Array, k_BxLxNxD: jax.Array, v_BxLxNxD: jax.Array,
                       causal: bool, keep_BxL: jax.Array | None = None,
                       probs_dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """XLA attention with the probabilities formed here (logits and softmax in f32, as the
  XLA path), so keys can be masked and the probabilities dropped out (the original's
  GPT-2/BERT attention). A query whose visible keys are all PAD spreads its weight evenly
  over them: PAD keys get a large negative logit, future keys a far larger one."""
  _, length, _, d = q_BxLxNxD.shape
  logits_dtype = jnp.promote_types(q_BxLxNxD.dtype, jnp.float32)
  logits_BxNxLxL = jnp.einsum('blnd,bknd->bnlk', q_BxLxNxD, k_BxLxNxD,
                              preferred_element_type=logits_dtype)
  logits_BxNxLxL = logits_BxNxLxL * jnp.asarray(d ** -0.5, logits_dtype)
  lowest = jnp.finfo(logits_dtype).min
  if keep_BxL is not None:
    logits_BxNxLxL = jnp.where(keep_BxL[:, None, None, :], logits_BxNxLxL, 0.35 * lowest)
  if causal:
    seen_1x1xLxL = jnp.tril(jnp.ones((1, 1, length, length), bool))
    logits_BxNxLxL = jnp.where(seen_1x1xLxL, logits_BxNxLxL, 0.7 * lowest)
  probs_BxNxLxL = jax.nn.softmax(logits_BxNxLxL.astype(jnp.float32), axis=-1)
  if probs_dropout is not None:
    probs_BxNxLxL = probs_dropout(probs_BxNxLxL)
  return jnp.einsum('bnlk,bknd->blnd', probs_BxNxLxL.astype(v_BxLxNxD.dtype), v_BxLxNxD)


def _per_shard(fn):
  """`fn` on each device's block of the batch when a mesh is active (else `fn` itself)."""
  spec = partitioning.logical_spec(_HEAD_LOGICAL)
  if spec is None:
    return fn
  axes = tuple(spec) + (None,) * (len(_HEAD_LOGICAL) - len(spec))
  if axes[1] is not None or axes[3] is not None:
    raise config_lib.ConfigError(f'sharding.rules split the attention length or head width '
                                 f'({spec}); attention kernels need them whole')
  return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec,) * 3,
                       out_specs=spec, check_vma=False)


def _cudnn(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, causal: bool) -> jax.Array:
  return jax.nn.dot_product_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, is_causal=causal,
                                      implementation='cudnn')


def _splash(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, causal: bool,
            interpret: bool = False) -> jax.Array:
  """The Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu), one example at a
  time; tiles of 512, 256 or 128 positions, the largest that divides the window.
  `interpret`: run the kernel in Pallas's interpreter (any platform; for tests)."""
  # pylint: disable=g-import-not-at-top  (Pallas only when a TPU step uses the kernel)
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  _, length, heads, d = q_BxLxNxD.shape
  if length % SPLASH_BLOCK:
    raise config_lib.ConfigError(f"model.attention='splash' needs the window a multiple of "
                                 f"{SPLASH_BLOCK} (got {length}); use 'auto'")
  block = max(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
  mask = (mask_lib.CausalMask if causal else mask_lib.FullMask)((length, length))
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                block_q_dkv=block, block_kv_dkv=block,
                                block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * heads),
                                      block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # B x N x L x D, the kernel's layout
  out_BxNxLxD = jax.vmap(kernel)(heads_first(q_BxLxNxD) * d ** -0.5, heads_first(k_BxLxNxD),
                                 heads_first(v_BxLxNxD))
  return jnp.swapaxes(out_BxNxLxD, 1, 2)
