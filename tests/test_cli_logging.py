"""The commands' logging: Orbax's warnings reach the user, only its known noise is dropped."""

import logging
import os
import sys

from twotower_jax import cli

_ORBAX_FILE = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'manager.py')


def _record(message: str, level: int = logging.WARNING, exc: bool = False,
            name: str = 'absl', pathname: str = _ORBAX_FILE) -> logging.LogRecord:
  exc_info = None
  if exc:
    try:
      raise OSError(28, 'No space left on device')
    except OSError:
      exc_info = sys.exc_info()
  return logging.LogRecord(name, level, pathname, 1, message, None, exc_info)


def test_orbax_warnings_pass_and_its_known_noise_does_not():
  keep = cli._drop_orbax_reports  # pylint: disable=protected-access
  assert keep(_record('Checkpoint save took 95s; consider fewer, larger saves'))
  assert keep(_record('Could not find the step metadata', logging.ERROR))
  assert not keep(_record('Given directory is read only=gs://b/run/checkpoints'))
  assert not keep(_record('CheckpointManager is in read-only mode'))
  assert not keep(_record('[process=0] Failed to write', logging.ERROR, exc=True))
  assert not keep(_record('Traceback (most recent call last):\n  File "x"', logging.ERROR))
  assert keep(_record('Fatal', logging.CRITICAL, exc=True))
  assert keep(_record('my own warning', pathname='/repo/twotower_jax/train/loop.py'))
  assert not keep(_record(f'Task exception was never retrieved {_ORBAX_FILE}',
                          logging.ERROR, name='asyncio', pathname='asyncio/base_events.py'))
