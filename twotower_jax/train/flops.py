"""Analytic FLOPs of a training step, and device peaks for MFU.

Model FLOPs per token (the 6N + attention convention of the PaLM paper, appendix B):
  forward  = 2 * N_matmul + 4 * L * H * A
  training = 3 * forward            (backward = 2x forward; remat is not counted)
where N_matmul counts the parameters that multiply every token once: every Dense
`kernel` (tower blocks, LSTM cells, gate), the embedding's projections (`in_proj`,
`out_proj` of the `projected` tables) and the output layer: the token table where it
is tied (the input lookup is a gather, not a matmul), else `output`; position tables,
biases and LayerNorms are left out. A is the number of attention layers applied per
token (n_towers times the tower type's registered `attention_layers`), L the
sequence length and H the attention width: 2*L*H for Q K^T plus 2*L*H for the
weighted sum of V, over the full L x L matrix (masked entries are computed too).
A model that ponders s extra passes runs the whole forward 1 + s times, and each extra
pass adds 2 * V * W for the expected token embedding (probabilities times the V x W table).
For two causal towers with n layers, width H, MLP F, vocab V and the concat gate:
  N_matmul = 2 * n * (4 H^2 + 2 H F) + 2 H^2 + V H
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.model import layers
from twotower_jax.model import towers

# Dense peak FLOP/s per device (one chip / one GPU) by compute dtype. On TPUs f32
# matmuls at JAX's default precision run as single bf16 passes, and on A100/H100/H200
# as TF32, so the f32 entry is the rate those matmuls actually get.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Matched as a substring of jax.Device.device_kind, most specific first.
    'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12},  # v6e (Trillium)
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},  # v5e
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12},  # v5p reports 'TPU v5'
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'H200': {'bfloat16': 989e12, 'float32': 494.7e12},  # SXM, dense (no sparsity)
    'H100 PCIe': {'bfloat16': 756e12, 'float32': 378e12},
    'H100': {'bfloat16': 989e12, 'float32': 494.7e12},  # SXM / HBM3
    'A100': {'bfloat16': 312e12, 'float32': 156e12},
}


def _path_names(path) -> list[str]:
  return [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]


def param_shapes(model) -> Any:
  """Abstract parameter tree (shapes only; nothing is allocated)."""
  tokens = jnp.zeros((1, model.cfg.max_len), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, tokens))
  return jax.tree.map(lambda x: getattr(x, 'value', x), boxed['params'],
                      is_leaf=lambda x: hasattr(x, 'value'))


# Embedding parameters that multiply every token once (the rest of `embed` is looked up).
_EMBED_MATMULS = ('token', 'output', 'in_proj', 'out_proj')


def matmul_params(params: Any) -> int:
  """Parameters that multiply every token once: Dense kernels, the embedding's projections
  and the output layer (the tied token table or `output`)."""
  untied = 'output' in params.get('embed', {})  # then the token table is only looked up
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _path_names(path)
    if names[-1] == 'kernel' or (names[0] == 'embed' and names[-1] in _EMBED_MATMULS and
                                 not (untied and names[-1] == 'token')):
      total += int(np.prod(leaf.shape))
  return total


def train_flops_per_token(model, seq_len: int) -> float:
  """Model FLOPs to train on one token (forward + backward), by the formula above."""
  cfg: layers.ModelConfig = model.cfg
  params = param_shapes(model)
  n_attention = cfg.n_towers * towers.get(cfg.tower_type).attention_layers(cfg)
  forward = 2.0 * matmul_params(params) + 4.0 * seq_len * cfg.d_model * n_attention
  steps = cfg.pondering.steps
  # Pondering: every pass is the whole forward again, plus the expected embedding of each
  # extra pass (the V-way distribution times the V x W token table).
  soft = 2.0 * int(np.prod(params['embed']['token'].shape)) if steps else 0.0
  return 3.0 * ((1 + steps) * forward + steps * soft)


def causal_formula_flops_per_token(cfg: layers.ModelConfig, seq_len: int) -> float:
  """The closed form for causal towers + concat gate (checks the tree count in tests)."""
  n, h, f, v = cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.vocab_size
  n_matmul = cfg.n_towers * n * (4 * h * h + 2 * h * f) + cfg.n_towers * h * h + v * h
  return 3.0 * (2.0 * n_matmul + 4.0 * seq_len * h * cfg.n_towers * n)


def train_flops_per_step(model, batch_size: int, seq_len: int) -> float:
  return train_flops_per_token(model, seq_len) * batch_size * seq_len


def device_peak(device: jax.Device, dtype: str) -> float | None:
  """Known dense peak FLOP/s of one device for `dtype`, or None (e.g. CPU)."""
  kind = getattr(device, 'device_kind', '')
  for key, peaks in PEAK_FLOPS.items():
    if key in kind:
      return peaks.get(dtype)
  return None


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large f32 matmul in this process (the CPU reference for MFU; the same
  2048^3 reference bench/ uses, so the log's MFU and docs/PERFORMANCE.md agree)."""
  import time  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best
