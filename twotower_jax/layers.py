"""The model's hyper-parameters and the small layers every module shares.

Every parameter is created with logical axis names (`vocab`, `embed`, `mlp`,
`heads`, `kv`, `gate_in`; `tower` and `layers` are added by vmap and scan) so the
config's rule table alone decides how it is sharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable copy of config.model plus the vocabulary size."""
  vocab_size: int
  n_towers: int = 2
  tower_type: str = 'causal'
  gate: str = 'concat'
  n_layers: int = 4
  d_model: int = 256
  n_heads: int = 4
  d_mlp: int = 1024
  max_len: int = 128
  dropout: float = 0.1
  scan_layers: bool = True
  dtype: str = 'float32'  # compute dtype of the tower matmuls; parameters stay float32
  remat: bool = False  # rematerialise each transformer block in the backward pass
  # Gates, embeddings, pondering: flat copies of config.model.<block>.<field> (NESTED).
  embedding_mode: str = 'shared'
  tied: bool = True
  input_grad_scale: float = 1.0
  latent_balance_weight: float = 0.0
  ponder_steps: int = 0
  ponder_temperature: float = 1.0

  NESTED = {'embedding_mode': ('embedding', 'mode'), 'tied': ('embedding', 'tied'),
            'input_grad_scale': ('embedding', 'input_grad_scale'),
            'latent_balance_weight': ('latent', 'balance_weight'),
            'ponder_steps': ('pondering', 'steps'),
            'ponder_temperature': ('pondering', 'temperature')}

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size'}
    flat = {k: config.model[k] for k in fields - set(cls.NESTED)}
    nested = {k: config.model[a][b] for k, (a, b) in cls.NESTED.items()}
    return cls(vocab_size=vocab_size, **flat, **nested)

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


def param_init(names: Sequence[str | None], std: float = INIT_STD) -> Any:
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(names))


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


def layer_norm(axis_name: str = 'embed', name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=1e-5, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)))


def dense(features: int, names: tuple[str, str], name: str | None = None,
          std: float = INIT_STD, dtype: Any = None) -> nn.Dense:
  """dtype=None computes in the promoted input/param dtype (f32 for the gate)."""
  return nn.Dense(features, name=name, kernel_init=param_init(names, std),
                  bias_init=zeros_init(names[1:]), dtype=dtype)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  return nn.gelu(x, approximate=True)
