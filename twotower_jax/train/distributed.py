"""Multi-process start-up: join the JAX distributed system before any other JAX use.

Three ways to run (docs/SCALING.md):
- one process (default): nothing to do;
- explicit: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables),
  e.g. several processes on one machine or GPU hosts;
- automatic on Cloud TPU VMs (every worker of a pod slice runs the same command and
  JAX reads the topology from the VM metadata), or anywhere with --distributed=on.
On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import jax

from twotower_jax import errors

log = logging.getLogger('twotower_jax')

MODES = ('auto', 'on', 'off')


class DistributedError(errors.UserError):
  """Inconsistent or unusable multi-process settings."""


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM: TPU env variables, /dev/accel* (v2-v5p) or /dev/vfio + libtpu."""
  if any(os.environ.get(k) for k in ('TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE',
                                      'CLOUD_TPU_TASK_ID')):
    return True
  if os.path.exists('/dev/accel0'):
    return True
  return os.path.isdir('/dev/vfio') and importlib.util.find_spec('libtpu') is not None


def settings(coordinator_address: str = '', num_processes: int = 0,
             process_id: int = -1) -> tuple[str, int, int]:
  """Flags, falling back to the JAX_* environment variables."""
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  n = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '0') or 0)
  pid = process_id if process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', '-1') or -1)
  return address, n, pid


def initialize(mode: str = 'auto', coordinator_address: str = '', num_processes: int = 0,
               process_id: int = -1) -> bool:
  """Calls jax.distributed.initialize when several processes run; True if it did."""
  if mode not in MODES:
    raise DistributedError(f'--distributed={mode!r} is unknown; use one of {MODES}')
  if mode == 'off':
    return False
  address, n, pid = settings(coordinator_address, num_processes, process_id)
  explicit = bool(address) or n > 1 or pid >= 0
  if explicit:
    if not address or n < 1 or not 0 <= pid < n:
      raise DistributedError(
          f'incomplete multi-process settings (coordinator_address={address!r}, '
          f'num_processes={n}, process_id={pid}); give all three, with 0 <= process_id < '
          'num_processes (flags or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)')
    if n == 1:
      return False
    kwargs = {'coordinator_address': address, 'num_processes': n, 'process_id': pid}
  elif mode == 'on' or on_cloud_tpu_vm():
    kwargs = {}  # JAX detects the cluster (TPU VM metadata, SLURM, Open MPI, ...)
  else:
    return False
  if jax.distributed.is_initialized():
    return True
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DistributedError(f'jax.distributed.initialize failed ({first[:300]}); check the '
                           'coordinator address/port and that every process was started') from None
  log.info('distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_index():  # progress lines come from process 0; others report problems only
    log.setLevel(logging.WARNING)
  return True
