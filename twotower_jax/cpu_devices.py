"""XLA:CPU devices: one JAX device per core, so a CPU step splits its batch over the cores.

On one CPU device XLA:CPU runs the step's ops one after another (independent ones side by
side where its scheduler finds them), each split over a thread pool of the cores. With one
device per core the default mesh (mesh.data=-1) gives each device its own rows of the batch,
the devices run their halves of the step side by side, and they meet once per step to sum
the gradients. On the 2-core development VM that is about 1.2x the tokens/s at the default
job's shape, with the same val loss at step 240 (docs/PERFORMANCE.md, "Against PyTorch
eager").

JAX fixes its CPU device count when it starts its backend, so the entry points (training,
experiments, bench scripts) call `use` with the job's configs first: it asks for the most
devices, up to the usable cores, that divide every config's batch (with its gradient
accumulation). It leaves the count alone where the user chose one (JAX_NUM_CPU_DEVICES, or
--xla_force_host_platform_device_count in XLA_FLAGS), where a config sets its own mesh, and
once JAX has started; training skips it in multi-process runs. `JAX_NUM_CPU_DEVICES=1`
gives the one-device step.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Iterable, Mapping

import jax
import ml_collections

# Most executions dispatched ahead of the host (`wait_behind`). XLA:CPU's devices in one
# process hung in a collective with many queued on them (2 devices, the tiny config's step
# dispatched back to back: 300 unbounded and 40 ahead hung; 24, 8 and 2 ahead did not, in
# 400-600 steps each); 8 ahead ran as fast as 50 unbounded (50.5 vs 49.4 ms a step).
IN_FLIGHT = 8
FORCE_FLAG = re.compile(r'--xla_force_host_platform_device_count(=|\s|$)')
DEFAULT_MESH = (-1, 1, 1)  # (data, fsdp, tower): the batch over every device


def usable_cores() -> int:
  """Cores this process may run on (its CPU affinity, e.g. under taskset), else all."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def count(configs: Iterable[ml_collections.ConfigDict], cores: int) -> int | None:
  """The most devices, at most `cores`, over which every config's batch splits evenly.

  None where a config sets its own mesh (its devices are the user's choice) or has no
  usable batch (validation reports that).
  """
  rows = 0
  for config in configs:
    mesh = (config.mesh.data, config.mesh.fsdp, config.mesh.tower)
    batch, accum = config.train.batch_size, config.train.get('grad_accum_steps', 1)
    if mesh != DEFAULT_MESH or accum < 1 or batch < 1 or batch % accum:
      return None
    rows = math.gcd(rows, batch // accum)  # each accumulation step's rows split over the devices
  if not rows:
    return None
  return max(d for d in range(1, max(1, cores) + 1) if rows % d == 0)


def chosen(env: Mapping[str, str] = os.environ) -> str | None:
  """Why the device count is the user's choice (a setting to respect), or None."""
  if env.get('JAX_NUM_CPU_DEVICES', '').strip():
    return 'JAX_NUM_CPU_DEVICES'
  if FORCE_FLAG.search(env.get('XLA_FLAGS', '')):
    return 'XLA_FLAGS --xla_force_host_platform_device_count'
  if jax.config.jax_num_cpu_devices != -1:
    return 'jax_num_cpu_devices'
  return None


def use(configs: Iterable[ml_collections.ConfigDict], cores: int | None = None) -> int | None:
  """Asks JAX for `count` CPU devices before its backend starts; the count, or None if left."""
  if chosen():
    return None
  n = count(configs, usable_cores() if cores is None else cores)
  if n is None or n == 1:
    return None
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # JAX has started its backend: its device count is fixed
    return None
  logging.getLogger('twotower_jax').info(
      'XLA:CPU: %d devices, one per core, the batch split over them '
      '(JAX_NUM_CPU_DEVICES=1 runs on one)', n)
  return n


def wait_behind(results: list, limit: int = IN_FLIGHT) -> None:
  """Waits for the result `limit` places behind the newest, so at most `limit` executions
  are in flight; call after each dispatch with the results so far (any backend)."""
  if len(results) > limit:
    jax.block_until_ready(results[-limit - 1])
