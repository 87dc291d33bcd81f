"""Shared benchmark plumbing: device peak, step timing, memory, JSON-lines output.

Benchmarks print a table and append one JSON object per measurement to a .jsonl
file, so numbers in docs/PERFORMANCE.md can be traced to a run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from twotower_jax import config as config_lib  # pylint: disable=wrong-import-position
from twotower_jax import cpu_devices  # pylint: disable=wrong-import-position
from twotower_jax.train import flops as flops_lib  # pylint: disable=wrong-import-position
from twotower_jax import hostmem  # pylint: disable=wrong-import-position
from twotower_jax.model import lm as model_lib  # pylint: disable=wrong-import-position
from twotower_jax.train import optimizer as optimizer_lib  # pylint: disable=wrong-import-position
from twotower_jax.train import sharding as sharding_lib  # pylint: disable=wrong-import-position
from twotower_jax.train import state as state_lib  # pylint: disable=wrong-import-position
from twotower_jax.train import loop as train_lib  # pylint: disable=wrong-import-position


def machine() -> dict[str, Any]:
  """What the numbers were measured on."""
  dev = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device': dev.device_kind,
          'n_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
          'machine': platform.machine(), 'jax': jax.__version__,
          'huge_pages': hostmem.active()}


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls, each waited on."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """FLOP/s of a large square matmul: the CPU 'peak' that MFU is measured against."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  return 2 * n ** 3 / min(timed(lambda: f(a, b), repeats))


def device_peak(dtype: str) -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained) for the first device and compute dtype."""
  dev = jax.devices()[0]
  if jax.default_backend() == 'cpu':
    return flops_lib.measure_matmul_flops(2048, 10), 'measured f32 2048^3 matmul, this process'
  peak = flops_lib.device_peak(dev, dtype)
  if peak is not None:
    return peak, f'{dev.device_kind} dense {dtype} spec (twotower_jax.train.flops)'
  return matmul_peak(4096, jnp.dtype(dtype)), f'measured {dtype} 4096^3 matmul'


def peak_memory_mb() -> float:
  """Peak device memory (accelerators) or peak host RSS of this process (CPU), MiB."""
  if jax.default_backend() != 'cpu':
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get('peak_bytes_in_use', 0) / 2 ** 20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_config(spec: str) -> ml_collections.ConfigDict:
  """get_config(ARG) of a config file named PATH or PATH:ARG (as --config= takes it)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_with(base: ml_collections.ConfigDict | None = None, **overrides) -> ml_collections.ConfigDict:
  """A config from dotted overrides, e.g. config_with(**{'model.n_towers': 1})."""
  c = base.copy_and_resolve_references() if base is not None else config_lib.base_config()
  config_lib.set_fields(c, overrides)
  return c


class StepBench:
  """One compiled train step of a config on random tokens, ready to time."""

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int):
    cpu_devices.use([config])  # as the training entry points do, if JAX has not started yet
    self.config = config
    self.model = model_lib.build(config, vocab_size)
    mesh = sharding_lib.make_mesh(config)
    rules = sharding_lib.rules(config)
    tx = optimizer_lib.make(config)
    state_sh = state_lib.shardings(self.model, tx, mesh, rules)
    batch_sh = sharding_lib.batch_sharding(mesh, rules)
    self.state = state_lib.create_sharded(self.model, tx, config.train.seed, state_sh)
    rows = np.random.default_rng(0).integers(
        4, vocab_size, (config.train.batch_size, config.data.seq_len + 1), dtype=np.int32)
    self.batch = jax.device_put(rows, batch_sh)
    step = train_lib.jit_train_step(config, self.model, tx, mesh, state_sh, batch_sh)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.tokens_per_step = config.train.batch_size * config.data.seq_len
    self.flops_per_step = flops_lib.train_flops_per_step(self.model, config.train.batch_size,
                                                         config.data.seq_len)

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics['loss']

  def run(self, steps: int) -> float:
    """Seconds for `steps` back-to-back steps (a few queued at most; waited on at the end)."""
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
      losses.append(self.step())
      cpu_devices.wait_behind(losses)  # as the training loop: at most a few steps queued
    jax.block_until_ready(losses[-1])
    return time.perf_counter() - t0

  def seconds_per_step(self, steps: int, repeats: int) -> list[float]:
    self.run(2)  # warm-up: first executions allocate
    return [self.run(steps) / steps for _ in range(repeats)]


def summarize(times: Sequence[float]) -> dict[str, float]:
  return {'median_s': statistics.median(times), 'min_s': min(times)}


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a') as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + '\n')


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
  """A fixed-width table of the chosen columns."""
  def fmt(v):
    if isinstance(v, float):
      return f'{v:.4g}' if abs(v) < 1e4 else f'{v:.3e}'
    return str(v)
  cells = [[fmt(r.get(c, '')) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print('  '.join(c.ljust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print('  '.join(v.ljust(w) for v, w in zip(row, widths)))
