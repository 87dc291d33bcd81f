"""Pre-flight: compile the train step before the loop and report what it will cost.

Compiling ahead of time (jit(...).lower(...).compile()) surfaces shape, sharding and
out-of-memory errors before any data is read, and gives the compile time, XLA's
memory analysis and the analytic FLOPs per step (flops.py) that the periodic log
turns into FLOP/s and MFU. It also warns when the workdir's disk has less free space
than the checkpoints the run will keep.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from twotower_jax import errors
from twotower_jax.train import flops as flops_lib

log = logging.getLogger('twotower_jax')

_MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                  'temp_size_in_bytes', 'generated_code_size_in_bytes')


@dataclasses.dataclass
class Preflight:
  """The compiled step and its costs; `throughput` turns step timings into MFU."""
  compiled: Any  # call it like the jitted step: compiled(state, batch)
  compile_s: float
  flops_per_step: float  # analytic model FLOPs of one global step (all devices)
  peak_flops: float | None  # summed over all devices; None = unknown (MFU omitted)
  peak_source: str
  memory: dict[str, int]  # per device, bytes, from compiled.memory_analysis()

  def summary(self) -> dict[str, Any]:
    """Fields for the 'run' metrics line."""
    out = {'compile_s': round(self.compile_s, 3), 'flops_per_step': self.flops_per_step,
           'peak_flops': self.peak_flops, 'peak_source': self.peak_source}
    out.update({f'memory_{k}': v for k, v in self.memory.items()})
    return out

  def throughput(self, steps: int, seconds: float) -> dict[str, float]:
    """Achieved model FLOP/s over `steps` steps and, with a known peak, MFU."""
    achieved = self.flops_per_step * steps / max(seconds, 1e-9)
    out = {'flops_per_s': achieved}
    if self.peak_flops:
      out['mfu'] = achieved / self.peak_flops
    return out


def peak_flops(config: ml_collections.ConfigDict) -> tuple[float | None, str]:
  """(peak FLOP/s of all devices together, where the number came from)."""
  n = jax.device_count()
  if config.train.peak_flops > 0:
    return config.train.peak_flops * n, 'config train.peak_flops x devices'
  device = jax.devices()[0]
  known = flops_lib.device_peak(device, config.model.dtype)
  if known is not None:
    return known * n, f'table: {device.device_kind} {config.model.dtype} x {n}'
  if device.platform == 'cpu':  # fake CPU devices share the cores: one matmul per process
    return (flops_lib.measure_matmul_flops() * jax.process_count(),
            'measured f32 matmul per process')
  return None, f'unknown device {device.device_kind!r}: set train.peak_flops'


def memory_stats(compiled: Any) -> dict[str, int]:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return {}
  if stats is None:
    return {}
  return {k: int(getattr(stats, k)) for k in _MEMORY_FIELDS if hasattr(stats, k)}


def run(train_fn: Any, state: Any, batch_sharding: Any, config: ml_collections.ConfigDict,
        model: Any) -> Preflight:
  """Compiles `train_fn` for (state, global batch) and logs compile time, memory, FLOPs."""
  tc = config.train
  batch = jax.ShapeDtypeStruct((tc.batch_size, config.data.seq_len + 1), jnp.int32,
                               sharding=batch_sharding)
  if jax.process_index() == 0:
    log.info('preflight: compiling the train step')
  t0 = time.perf_counter()
  compiled = train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  step_flops = flops_lib.train_flops_per_step(model, tc.batch_size, config.data.seq_len)
  peak, source = peak_flops(config)
  memory = memory_stats(compiled)
  pf = Preflight(compiled, compile_s, step_flops, peak, source, memory)
  if jax.local_devices()[0].platform == 'cpu':
    check_host_memory(memory, config, host_available_bytes(), jax.local_device_count())
  if jax.process_index():  # every process compiled; one reports
    return pf
  mib = {k: v / 2**20 for k, v in memory.items()}
  log.info('preflight: train step compiled in %.1fs | %.3g model FLOPs/step (%s tokens) | '
           'peak %s (%s)', compile_s, step_flops, f'{tc.batch_size * config.data.seq_len:,}',
           f'{peak:.3g} FLOP/s' if peak else 'unknown', source)
  if memory:
    log.info('preflight memory per device: arguments %.1f MiB, outputs %.1f MiB, '
             'temporaries %.1f MiB, code %.1f MiB', mib.get('argument_size_in_bytes', 0),
             mib.get('output_size_in_bytes', 0), mib.get('temp_size_in_bytes', 0),
             mib.get('generated_code_size_in_bytes', 0))
  return pf


def host_available_bytes(meminfo: str = '/proc/meminfo') -> int | None:
  """MemAvailable of this host (None where the kernel does not say)."""
  try:
    with open(meminfo, encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    return None
  return None


def check_host_memory(memory: dict[str, int], config: ml_collections.ConfigDict,
                      available: int | None, n_local: int) -> None:
  """UserError when the CPU step's temporaries cannot fit in this host's free memory.

  On CPU every local device's temporaries live in host RAM and XLA allocates them at the
  first step; far beyond it, that step dies with RESOURCE_EXHAUSTED (or the kernel kills
  it) instead of a line that names the fix.
  """
  need = memory.get('temp_size_in_bytes', 0) * n_local
  if available is None or need <= available:
    return
  tc = config.train
  raise errors.UserError(
      f'the train step needs about {need / 2**20:,.0f} MiB of temporaries on this host '
      f'({n_local} device(s), train.batch_size={tc.batch_size}, seq_len '
      f'{config.data.seq_len}) but only {available / 2**20:,.0f} MiB is free; lower '
      'train.batch_size, or raise train.grad_accum_steps (same batch in micro-batches)')


def check_state_memory(abstract_state: Any, available: int | None) -> None:
  """UserError on CPU when the train state alone (parameters and AdamW moments, sized by
  the model's shapes) cannot fit in this host's free memory, naming its largest parameter;
  the temporaries check after the compile would blame train.batch_size instead."""
  need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  if available is None or need <= available:
    return
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
  path, big = max(leaves, key=lambda leaf: leaf[1].size)
  raise errors.UserError(
      f'the train state (parameters and optimizer moments) takes {need / 2**20:,.0f} MiB but '
      f'only {available / 2**20:,.0f} MiB is free on this host; its largest parameter, '
      f'params{jax.tree_util.keystr(path)} {tuple(big.shape)}, is sized by the model: lower '
      'model.max_len, model.d_model, data.vocab_size or the layer count')


def check_disk(ckpt_dir: str, checkpoint_bytes: int, n_checkpoints: int) -> str | None:
  """Logs (and returns) a warning when the disk holding `ckpt_dir` has room for fewer than
  `n_checkpoints` checkpoints of about `checkpoint_bytes` each (kept ones plus the one being
  written); a save that then fails stops the run with an error, nothing lost. A bucket
  (gs://) has no free-space figure: not checked."""
  if '://' in ckpt_dir:
    return None
  target = ckpt_dir
  while not os.path.exists(target):
    target = os.path.dirname(target)
  free = shutil.disk_usage(target).free
  need = checkpoint_bytes * n_checkpoints
  if free >= need:
    return None
  message = (f'preflight: only {free / 2**20:.1f} MiB free for {ckpt_dir}, less than '
             f'{n_checkpoints} checkpoints of about {checkpoint_bytes / 2**20:.1f} MiB each; '
             'free space or lower train.keep_checkpoints (a save that fails stops the run)')
  log.warning('%s', message)
  return message
