"""Run metrics as they are written: one Writer over the metric backends, and the log line.

The train loop writes through `Writer`; each line goes to every backend:

  metrics.jsonl      always: the record of the run (format: workdir.py)
  TensorBoard        always: DIR/tensorboard/ event files (tensorboardX, no TensorFlow);
                     a resumed run purges the events after its checkpoint's step
  Weights & Biases   when train.wandb_project is set (WANDB_MODE=offline works offline)

clu.metric_writers is the usual JAX interface for this, but it imports TensorFlow on
import; the three backends here are the ones this project needs. Every line has `kind`
('train', 'eval', 'baseline', 'run', ...) and, for train and eval lines, `step`.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any, Iterable

from twotower_jax import errors
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib


class _Backend:
  """One place metrics go: scalars of a line at a step, a resume, the end."""

  def scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
    raise NotImplementedError

  def resume(self, step: int) -> None:
    """The run continues after `step` (< 0: from the start): later points are redone."""

  def close(self) -> None:
    pass


class _TensorBoard(_Backend):
  """tensorboardX event files; opened at the resume, so the points after it are purged."""

  def __init__(self, logdir: str):
    self.logdir, self._writer = logdir, None

  def _open(self, purge_step: int | None):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    if paths.is_remote(self.logdir):
      _register_remote_events()
    # tensorboardX names a file by the second it opened it; two runs in one second would
    # write one file, the second over the first: the nanoseconds keep them apart, in order.
    self._writer = SummaryWriter(self.logdir, purge_step=purge_step,
                                 filename_suffix=f'.{time.time_ns()}')

  def resume(self, step: int) -> None:
    if self._writer is None:
      self._open(step + 1 if step >= 0 else None)

  def scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      self._open(None)
    for k, v in values.items():
      self._writer.add_scalar(f'{kind}/{k}', v, int(step))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class _RemoteEvents:
  """An event file on Cloud Storage for tensorboardX: the bytes so far, uploaded whole at
  each flush (an object cannot be appended to)."""

  def __init__(self, path: str):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    paths.write_atomic(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _RemoteEventsFactory:
  def open(self, path: str) -> _RemoteEvents:
    return _RemoteEvents(path)

  def directory_check(self, path: str) -> None:
    pass  # a bucket prefix needs no creating


def _register_remote_events() -> None:
  """tensorboardX writes gs:// through its own google-cloud-storage client; this routes it
  through epath like every other file of the workdir."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory('gs', _RemoteEventsFactory())


class _Wandb(_Backend):
  """A Weights & Biases run, its id kept in DIR/wandb_run_id so a resumed run continues it
  (W&B drops points at steps it already has; a resumed run's are bit-identical anyway)."""

  def __init__(self, workdir: str, project: str, config: dict[str, Any] | None):
    import wandb  # pylint: disable=g-import-not-at-top
    id_file = workdir_lib.path(workdir, workdir_lib.WANDB_ID)
    run_id = paths.read_bytes(id_file).decode().strip() if paths.exists(id_file) else None
    local = (os.path.join(tempfile.gettempdir(), 'twotower_wandb') if paths.is_remote(workdir)
             else workdir)  # W&B's own files need a local folder
    os.makedirs(local, exist_ok=True)
    try:
      self._run = wandb.init(project=project, id=run_id, resume='allow', dir=local,
                             name=paths.absolute(workdir).rsplit('/', 1)[-1], config=config)
    except Exception as e:  # pylint: disable=broad-except  # W&B's login, network, ...
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise errors.UserError(f'train.wandb_project={project!r}: Weights & Biases did not start '
                             f'({first}); run `wandb login`, set WANDB_MODE=offline, or unset '
                             'train.wandb_project') from None
    if run_id is None:
      paths.write_atomic(id_file, self._run.id + '\n')

  def scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
    self._run.log({f'{kind}/{k}': v for k, v in values.items()}, step=int(step))

  def close(self) -> None:
    self._run.finish()


class Writer:
  """Writes metric lines to metrics.jsonl, TensorBoard and (with `wandb_project`) W&B; a
  disabled writer (processes > 0) does nothing."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               wandb_project: str = '', config: dict[str, Any] | None = None):
    self.enabled = enabled
    self.workdir = workdir
    self._backends: list[_Backend] = []
    if enabled and tensorboard:
      self._backends.append(_TensorBoard(workdir_lib.path(workdir, workdir_lib.TENSORBOARD)))
    if enabled and wandb_project:
      self._backends.append(_Wandb(workdir, wandb_project, config))

  def write(self, kind: str, values: dict[str, Any], step: int | None = None) -> None:
    if not self.enabled:
      return
    line = workdir_lib.metrics_line(kind, values, step)
    workdir_lib.append_metrics(self.workdir, line)
    if step is not None:
      scalars = {k: v for k, v in line.items()
                 if k not in ('kind', 'step') and isinstance(v, (int, float))}
      for backend in self._backends:
        backend.scalars(kind, step, scalars)

  def truncate_after(self, step: int) -> None:
    """Drops lines of steps > `step` (a resumed run rewrites them); step < 0 drops all."""
    if not self.enabled:
      return
    for backend in self._backends:
      backend.resume(step)
    if not paths.exists(workdir_lib.path(self.workdir, workdir_lib.METRICS)):
      return
    kept = [line for line in workdir_lib.read_metrics(self.workdir)
            if line.get('step', -1) <= step and step >= 0]
    workdir_lib.rewrite_metrics(self.workdir, kept)

  def close(self) -> None:
    for backend in self._backends:
      backend.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def log_line(step: int, total: int, values: dict[str, float], eta_s: float,
             keys: Iterable[str] = ('loss', 'lr', 'grad_norm', 'tokens_per_s')) -> str:
  parts = [f'step {step}/{total}']
  for k in keys:
    if k in values:
      v = values[k]
      if k == 'tokens_per_s':
        parts.append(f'{k} {v:,.0f}')
      elif k == 'mfu':
        parts.append(f'mfu {100 * v:.1f}%')
      else:
        parts.append(f'{k} {v:.4g}')
  parts.append(f'eta {format_duration(eta_s)}')
  return ' | '.join(parts)
