"""The model's hyper-parameters and the small layers every module shares.

Every parameter is created with logical axis names (`vocab`, `embed`, `mlp`,
`heads`, `kv`, `gate_in`; `tower` and `layers` are added by vmap and scan) so the
config's rule table alone decides how it is sharded.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import ml_collections

from twotower_jax import config as config_lib

INIT_STD = 0.02


ModelConfig = ml_collections.FrozenConfigDict  # config.model + vocab_size, hashable


def model_config(model: ml_collections.ConfigDict | dict[str, Any] | None = None,
                 vocab_size: int | None = None, platform: str = '',
                 **overrides: Any) -> ModelConfig:
  """The model's hyper-parameters: a frozen copy of `config.model` plus `vocab_size` and
  `platform` (the one its steps are lowered for; '' = this process's backend).

  `config.base_config()` is the one schema of these fields; `overrides` are dotted
  fields set on top (`model_config(vocab_size=40, n_layers=1, **{'embedding.mode':
  'per_tower'})`, for tests and benchmarks). Frozen so a Flax module can hold it.
  """
  section = config_lib.base_config().model
  if model is not None:
    section.update(model.to_dict() if isinstance(model, ml_collections.ConfigDict) else model)
  config_lib.set_fields(section, overrides)
  if vocab_size is not None:
    section.vocab_size = vocab_size
  section.platform = platform
  if 'vocab_size' not in section:
    raise ValueError('model_config needs vocab_size')
  return ml_collections.FrozenConfigDict(section)


def compute_dtype(cfg: ModelConfig) -> Any:
  """Compute dtype of the tower matmuls; parameters stay float32."""
  return jnp.dtype(cfg.dtype)


# model.remat_policy: what a rematerialised block keeps from its forward pass. 'full' keeps
# only its input (everything recomputed); 'matmuls' also keeps the outputs its blocks name
# with `saved` (the weight matmuls and attention), so the backward pass recomputes only
# the elementwise work: most of remat's memory saving at little of its compute.
SAVED_NAMES = ('qkv', 'attention', 'attn_out', 'mlp_in', 'mlp_out')
# cuDNN attention's forward kernel (jax.nn.dot_product_attention on CUDA): its softmax
# statistics are a residual of the kernel's own VJP that no name can tag.
CUDNN_ATTENTION_FORWARD = ('dot_product_attention_fwd', 'dot_product_attention_fwd_wrapper')


def _cudnn_attention_forward(prim, *_, **__) -> bool:
  return prim.name in CUDNN_ATTENTION_FORWARD


REMAT_POLICIES = {'full': None,
                  'matmuls': jax.checkpoint_policies.save_from_both_policies(
                      jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
                      _cudnn_attention_forward)}


def saved(x: jax.Array, name: str) -> jax.Array:
  """`x` tagged as one of SAVED_NAMES: kept under remat_policy='matmuls' (else a no-op)."""
  assert name in SAVED_NAMES, name
  return ad_checkpoint.checkpoint_name(x, name)


def remat(module_cls: Any, cfg: ModelConfig) -> Any:
  """`module_cls` rematerialised by model.remat_policy (the loop form needs prevent_cse)."""
  return nn.remat(module_cls, prevent_cse=not cfg.scan_layers,
                  policy=REMAT_POLICIES[cfg.remat_policy])


def head_dim(cfg: ModelConfig) -> int:
  return cfg.d_model // cfg.n_heads


def param_init(names: Sequence[str | None], std: float = INIT_STD) -> Any:
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(names))


def residual_std(cfg: ModelConfig) -> float:
  """Init std of the residual output projections: GPT-2's 0.02 / sqrt(2 n_layers); with
  pondering.init_std_scale='passes' PonderingLM's 0.02 / sqrt(2 n_layers (steps + 1))."""
  if cfg.pondering.init_std_scale == 'passes':
    return INIT_STD / (2 * cfg.n_layers * (cfg.pondering.steps + 1)) ** 0.5
  return INIT_STD / (2 * cfg.n_layers) ** 0.5


def orthogonal_init(iterations: int = 60) -> Any:
  """A Haar-random (semi-)orthogonal matrix: the polar factor of a Gaussian one.

  Newton-Schulz iterations (matmuls only) instead of nn.initializers.orthogonal's
  LAPACK QR: two QRs running concurrently in one jitted, tower-vmapped init
  deadlock XLA:CPU (jax 0.10.2), which hung bilstm initialisation on one device.
  """
  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    rows, cols = math.prod(shape[:-1]), shape[-1]
    tall = rows >= cols
    g = jax.random.normal(key, (rows, cols) if tall else (cols, rows), jnp.float32)
    x = g / jnp.linalg.norm(g)  # Frobenius scaling: every singular value in (0, 1]
    x = jax.lax.fori_loop(0, iterations, lambda _, x: 1.5 * x - 0.5 * x @ (x.T @ x), x)
    return (x if tall else x.T).reshape(shape).astype(dtype)
  return init


def zeros_init(names: Sequence[str | None]) -> Any:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def torch_linear_init(names: Sequence[str | None], fan_in: int,
                      bias_names: Sequence[str | None] | None = None) -> tuple[Any, Any]:
  """(kernel_init, bias_init) of torch.nn.Linear's default for a layer reading fan_in
  features: weight kaiming_uniform(a=sqrt(5)) and bias both U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  The bias's axes: `bias_names`, else a Dense bias's (the kernel's without the input)."""
  bound = 1.0 / math.sqrt(fan_in)

  def uniform(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return (nn.with_logical_partitioning(uniform, tuple(names)),
          nn.with_logical_partitioning(uniform, tuple(names[1:] if bias_names is None
                                                      else bias_names)))


def layer_norm(axis_name: str = 'embed', name: str | None = None,
               eps: float = 1e-5) -> nn.LayerNorm:
  """LayerNorm with logical axis names; eps = model.head.ln_eps for the gates' norms."""
  return nn.LayerNorm(
      epsilon=eps, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)))


def dense(features: int, names: tuple[str, str], name: str | None = None,
          std: float = INIT_STD, dtype: Any = None, init: str = 'normal',
          fan_in: int = 0) -> nn.Dense:
  """dtype=None computes in the promoted input/param dtype (f32 for the gate). init:
  'normal' (N(0, std) kernel, zero bias) | 'torch_linear' (torch.nn.Linear's default for
  an input width fan_in)."""
  if init == 'torch_linear':
    kernel_init, bias_init = torch_linear_init(names, fan_in)
    return nn.Dense(features, name=name, kernel_init=kernel_init, bias_init=bias_init,
                    dtype=dtype)
  return nn.Dense(features, name=name, kernel_init=param_init(names, std),
                  bias_init=zeros_init(names[1:]), dtype=dtype)


def gelu(x: jnp.ndarray, form: str = 'tanh') -> jnp.ndarray:
  """GELU: 'tanh' (the approximation, GPT-2's) or 'erf' (exact, torch's nn.GELU())."""
  return nn.gelu(x, approximate=form == 'tanh')
