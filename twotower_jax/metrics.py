"""Run metrics: DIR/metrics.jsonl (one JSON object per line) and TensorBoard events.

Every line has `kind` ('train', 'eval', 'baseline', 'run') and, for train and eval
lines, `step`. The TensorBoard writer is tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

FILENAME = 'metrics.jsonl'


def _plain(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf
  return value


class Writer:
  """Appends metric lines; a disabled writer (processes > 0) does nothing."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, FILENAME)
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, kind: str, values: dict[str, Any], step: int | None = None) -> None:
    if not self.enabled:
      return
    line = {'kind': kind}
    if step is not None:
      line['step'] = int(step)
    line.update({k: _plain(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(line) + '\n')
    if self._tb is not None and step is not None:
      for k, v in line.items():
        if k not in ('kind', 'step') and isinstance(v, (int, float)):
          self._tb.add_scalar(f'{kind}/{k}', v, int(step))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops lines of steps > `step` (a resumed run rewrites them); step < 0 drops all."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = [line for line in read(self.path) if line.get('step', -1) <= step and step >= 0]
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for line in kept:
        f.write(json.dumps(line) + '\n')
    os.replace(tmp, self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(path: str) -> list[dict[str, Any]]:
  """All complete lines of a metrics file (a torn last line is skipped)."""
  out = []
  with open(path) as f:
    for raw in f:
      try:
        out.append(json.loads(raw))
      except json.JSONDecodeError:
        continue
  return out


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
