"""SIGTERM / SIGINT: finish the current step, save, exit cleanly; rerunning resumes.

One process: a signal handler sets a flag that the train loop reads after each step.
Several processes (multi-host): every host must stop at the same step, so the loop
asks Orbax's preemption sync point (`CheckpointManager.reached_preemption`, JAX's
preemption service, which itself listens for SIGTERM), and hosts also agree on the
local flag (set by SIGINT) at each check with one all-gather.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

import jax
import numpy as np

log = logging.getLogger('twotower_jax')


class Watcher:
  """Remembers that a stop signal arrived; `should_stop(step)` is the loop's check."""

  def __init__(self, mngr=None):
    self.mngr = mngr
    self.signal_name: str | None = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signal_name is None:
      log.warning('received %s: finishing this step, saving a checkpoint, then exiting',
                  signal.Signals(signum).name)
    self.signal_name = signal.Signals(signum).name

  def requested(self) -> bool:
    return self.signal_name is not None

  def should_stop(self, step: int, exchange: bool = True) -> bool:
    """True on every host at the same step once any host was asked to stop.

    Multi-host: the preemption sync point is asked every step (that is its contract);
    the local flags are exchanged only where `exchange` (the loop's log steps).
    """
    if jax.process_count() == 1:
      return self.requested()
    if self.mngr is not None and self.mngr.reached_preemption(step):
      self.signal_name = self.signal_name or 'preemption notice'
      return True
    if not exchange:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(self.requested(), np.int32))
    if np.any(flags):
      self.signal_name = self.signal_name or 'a stop signal on another host'
      return True
    return False


@contextlib.contextmanager
def watch(mngr=None) -> Iterator[Watcher]:
  """Installs the handlers for the duration of training and restores the old ones."""
  watcher = Watcher(mngr)
  if threading.current_thread() is not threading.main_thread():
    yield watcher  # signal handlers can only be set from the main thread
    return
  # On multi-host runs JAX's preemption service owns SIGTERM; we only add SIGINT.
  signums = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
  old = {s: signal.signal(s, watcher._handle) for s in signums}  # pylint: disable=protected-access
  try:
    yield watcher
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
