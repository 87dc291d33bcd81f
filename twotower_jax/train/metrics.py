"""Run metrics as they are written: DIR/metrics.jsonl lines, TensorBoard events, the log line.

Every line has `kind` ('train', 'eval', 'baseline', 'run') and, for train and eval
lines, `step` (the format: workdir.py). The TensorBoard writer is tensorboardX,
which needs no TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from twotower_jax import workdir as workdir_lib


class Writer:
  """Appends metric lines to DIR/metrics.jsonl (and TensorBoard); a disabled writer
  (processes > 0) does nothing."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD))

  def write(self, kind: str, values: dict[str, Any], step: int | None = None) -> None:
    if not self.enabled:
      return
    line = workdir_lib.metrics_line(kind, values, step)
    workdir_lib.append_metrics(self.workdir, line)
    if self._tb is not None and step is not None:
      for k, v in line.items():
        if k not in ('kind', 'step') and isinstance(v, (int, float)):
          self._tb.add_scalar(f'{kind}/{k}', v, int(step))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops lines of steps > `step` (a resumed run rewrites them); step < 0 drops all."""
    if not self.enabled or not os.path.exists(workdir_lib.path(self.workdir, workdir_lib.METRICS)):
      return
    kept = [line for line in workdir_lib.read_metrics(self.workdir)
            if line.get('step', -1) <= step and step >= 0]
    workdir_lib.rewrite_metrics(self.workdir, kept)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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
