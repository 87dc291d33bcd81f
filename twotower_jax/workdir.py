"""The workdir: every file a run and its analysis write, their names and formats.

The one owner of the layout (preference.csv's columns: preference_table.py). Training, the analysis, the report and `--compare`
find files through these names and read or write them through these functions:

  DIR/config.json                  the resolved config (`write_config`, `read_config`)
  DIR/train.lock                   held (flock) by a training run's process 0 (`training_lock`)
  DIR/tokenizer.model              SentencePiece, trained on first use
  DIR/checkpoints/<step>/          Orbax: state, data, meta (train/checkpoints.py)
  DIR/metrics.jsonl                one JSON object per line with `kind` (`read_metrics`)
  DIR/tensorboard/                 the same scalars as event files
  DIR/wandb_run_id                 the Weights & Biases run (train.wandb_project) a resume continues
  DIR/analysis/                    preference.csv, summary.json, token_view.json,
                                   structural_probe.json, tuned_lens.json, probe/, report.md,
                                   report.html, figures/, compare/, steps/<step>/,
                                   over_training.json, over_training.md
  DIR/generate/                    generations.jsonl (one sample per line, `write_jsonl`),
                                   generations.html (python -m twotower_jax.generate)
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import socket
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import paths

CONFIG_JSON = 'config.json'
LOCK = 'train.lock'
TOKENIZER = 'tokenizer.model'
CHECKPOINTS = 'checkpoints'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'
WANDB_ID = 'wandb_run_id'
ANALYSIS = 'analysis'
# Inside DIR/analysis/.
PREFERENCE_CSV = 'preference.csv'
SUMMARY_JSON = 'summary.json'
TOKEN_VIEW_JSON = 'token_view.json'
STRUCT_JSON = 'structural_probe.json'
TUNED_LENS_JSON = 'tuned_lens.json'  # analysis.lens (analysis/tuned_lens.py)
PROBE_DIR = 'probe'
FIG_DIR = 'figures'
REPORT_MD = 'report.md'
REPORT_HTML = 'report.html'
COMPARE_DIR = 'compare'
STEPS_DIR = 'steps'  # analysis/steps/<step>/: one full analysis per checkpoint (--steps)
OVER_TRAINING_JSON = 'over_training.json'
OVER_TRAINING_MD = 'over_training.md'
COMPARE_JSON = 'compare.json'
COMPARE_MD = 'compare.md'
GENERATE = 'generate'
# Inside DIR/generate/.
GENERATIONS_JSONL = 'generations.jsonl'
GENERATIONS_HTML = 'generations.html'
TOP_K = 20  # items per tower in summary.json's top_items (and the report's tables)


class WorkdirError(errors.UserError):
  """A workdir file that is missing or unreadable; the message says which and what to do."""


def path(workdir: str, *names: str) -> str:
  """DIR/name/...: a local path made absolute, or a gs:// URL (paths.py)."""
  return paths.join(workdir, *names)


def analysis_dir(workdir: str) -> str:
  return path(workdir, ANALYSIS)


def generate_dir(workdir: str) -> str:
  return path(workdir, GENERATE)


# ---------------------------------------------------------------- config.json


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Written to a temporary file and renamed, so a kill never leaves half a file."""
  write_json(path(workdir, CONFIG_JSON), config_lib.to_dict(config), indent=2, sort_keys=True)


# Sections every version of write_config has written (the whole resolved config).
WRITTEN_SECTIONS = ('model', 'data', 'train')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (base_config() + config.json)."""
  file = path(workdir, CONFIG_JSON)
  if not paths.exists(file):
    raise WorkdirError(f'{file} is missing; --workdir must be a directory written by '
                       'python -m twotower_jax.main')
  fix = 'put back the config.json of the run that wrote this workdir, or use a new --workdir'
  try:
    with paths.open_file(file, encoding='utf-8') as f:
      raw = json.load(f)
  except OSError as e:
    raise WorkdirError(f'cannot read {file} ({e.strerror}); {fix}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{file} is damaged, not valid JSON ({e}); {fix}') from None
  if not isinstance(raw, dict):
    kind = 'null' if raw is None else type(raw).__name__
    raise WorkdirError(f'{file} holds a JSON {kind}, not a run config (an object of sections); '
                       f'{fix}')
  try:
    config = config_lib.from_dict(raw)
    _check_types(config, config_lib.base_config(), '')
  except (TypeError, ValueError, AttributeError) as e:
    raise WorkdirError(f'{file} has a value of the wrong type ({str(e).splitlines()[0]}); '
                       f'{fix}') from None
  missing = [s for s in WRITTEN_SECTIONS if s not in raw]
  if missing:  # every version writes the whole config: `{}` is damage, not defaults
    raise WorkdirError(f'{file} is damaged: it lacks the {", ".join(missing)} section(s) that '
                       f'every run writes; {fix}')
  return config


def _check_types(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict,
                 prefix: str) -> None:
  """TypeError for a field of config.json whose JSON type does not fit the schema's (a
  section that is not an object, null for a number); ConfigDict itself refuses the rest."""
  for key in base.keys():
    if key not in config:
      continue
    want, got = base[key], config[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(got, ml_collections.ConfigDict):
        raise TypeError(f'{prefix}{key} is a {type(got).__name__}, not an object')
      _check_types(got, want, f'{prefix}{key}.')
    elif want is not None and got is None:
      raise TypeError(f'{prefix}{key} is null')


# ---------------------------------------------------------------- train.lock


class WorkdirBusy(WorkdirError):
  """Another training run holds the workdir."""


def lock_holder(workdir: str) -> str | None:
  """Who holds DIR/train.lock ('pid N on HOST since T'), or None when no run holds it.

  Reads only: a reader never creates the lock file. A gs:// workdir has none.
  """
  if paths.is_remote(workdir):
    return None
  file = path(workdir, LOCK)
  try:
    fd = os.open(file, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return None  # nobody holds it: a leftover of a killed run
  except OSError:
    return _holder_text(fd)
  finally:
    os.close(fd)


def _holder_text(fd: int) -> str:
  try:
    text = os.pread(fd, 200, 0).decode('utf-8', 'replace').strip()
  except OSError:
    text = ''
  return text or 'holder unknown'


@contextlib.contextmanager
def training_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive flock on DIR/train.lock for the life of a training run.

  The OS releases it when the process ends in any way (kill -9 included), so a lock
  is never stale; a second run is refused at once, naming the holder written in the
  file. The file is removed on exit, and a workdir this call created is removed again
  when nothing else was written to it (bad input leaves no trace). Cloud Storage has no
  locks: a gs:// workdir is not guarded against a second run (docs/SCALING.md).
  """
  workdir = paths.absolute(workdir)
  if paths.is_remote(workdir):
    created = not paths.exists(workdir)
    try:
      yield
    except BaseException:
      if created:
        _remove_unstarted(workdir)
      raise
    return
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = _locked_fd(path(workdir, LOCK))
  except WorkdirBusy:
    raise
  except OSError as e:
    raise _unwritable(workdir, e) from None
  try:
    stamp = datetime.datetime.now().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()} since {stamp}\n'.encode(), 0)
    yield
  except BaseException:
    if created:
      _remove_unstarted(workdir)
    raise
  finally:
    with contextlib.suppress(OSError):
      os.unlink(path(workdir, LOCK))  # before unlocking: no one can lock this file after us
    os.close(fd)
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # only when empty


def _remove_unstarted(workdir: str) -> None:
  """A run that created DIR and failed before it recorded anything (no config.json, no
  checkpoint: refused by the pre-flight, a bad value found late, Ctrl-C) takes back what it
  wrote first, the tokenizer and Orbax's empty checkpoints/, so bad input leaves no trace."""
  ckpt = path(workdir, CHECKPOINTS)
  if paths.exists(path(workdir, CONFIG_JSON)) or (paths.isdir(ckpt) and paths.listdir(ckpt)):
    return
  with contextlib.suppress(OSError):
    if not paths.is_remote(ckpt):
      os.rmdir(ckpt)
  with contextlib.suppress(OSError):
    paths.remove(path(workdir, TOKENIZER))


def _locked_fd(file: str) -> int:
  """An fd of `file` holding its exclusive lock; WorkdirBusy when another process has it."""
  while True:
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder_text(fd)
      os.close(fd)
      raise WorkdirBusy(f'{os.path.dirname(file)} is being trained by another run ({holder}); '
                        'wait for it to finish or stop it, or use another --workdir') from None
    try:
      if os.stat(file).st_ino == os.fstat(fd).st_ino:
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)  # the holder removed the file between our open and lock: take the new one


def _unwritable(target: str, e: OSError) -> WorkdirError:
  """One line for a directory this process cannot write (read-only, no permission, full)."""
  if e.errno in (errno.ENOTDIR, errno.EEXIST) and os.path.exists(target) and not os.path.isdir(
      target):
    return WorkdirError(f'{target} is a file, not a directory; pass a directory (a new one, or '
                        'the workdir of an earlier run) as --workdir')
  return WorkdirError(f'cannot write to {target} ({e.strerror}); pass a writable --workdir')


def check_writable(target: str, flag: str = '--out') -> None:
  """WorkdirError before any work when `target` (a folder, made later) cannot be written:
  it or its nearest existing parent is read-only or not ours. A URL is checked by its
  first write."""
  if paths.is_remote(target):
    return
  probe = os.path.abspath(target)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise WorkdirError(f'cannot write to {target} ({probe} is not a writable folder); pass '
                       f'{flag}=DIR, a writable location')


# ---------------------------------------------------------------- metrics.jsonl


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All complete lines of DIR/metrics.jsonl (a torn last line is skipped)."""
  out = []
  file = path(workdir, METRICS)
  if not paths.exists(file):
    return out
  with paths.open_file(file) as f:
    for raw in f:
      try:
        out.append(json.loads(raw))
      except json.JSONDecodeError:
        continue
  return out


def _plain(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf
  return value


def metrics_line(kind: str, values: dict[str, Any], step: int | None = None) -> dict[str, Any]:
  """One metrics.jsonl record: `kind`, `step` (train and eval lines), then the values."""
  line = {'kind': kind}
  if step is not None:
    line['step'] = int(step)
  line.update({k: _plain(v) for k, v in values.items()})
  return line


def append_metrics(workdir: str, line: dict[str, Any]) -> None:
  """Appends one line; a Cloud Storage object cannot be appended to, so it is rewritten."""
  if paths.is_remote(workdir):
    rewrite_metrics(workdir, [*read_metrics(workdir), line])
    return
  with open(path(workdir, METRICS), 'a') as f:
    f.write(json.dumps(line) + '\n')


def rewrite_metrics(workdir: str, lines: Sequence[dict[str, Any]]) -> None:
  """Replaces DIR/metrics.jsonl atomically (a resumed run drops the lines it will redo)."""
  paths.write_atomic(path(workdir, METRICS), ''.join(json.dumps(line) + '\n' for line in lines))


# ---------------------------------------------------------------- JSON outputs


def clean(x):
  """Plain Python numbers; NaN stays NaN (json writes NaN, json.load reads it back; n/a)."""
  if isinstance(x, dict):
    return {k: clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return clean(x.tolist())
  if isinstance(x, (float, np.floating)):
    return float(x)
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(file: str, obj: Any, indent: int = 1, sort_keys: bool = False) -> None:
  """Atomic: written beside the target and renamed over it (paths.write_atomic)."""
  paths.write_atomic(file, json.dumps(clean(obj), indent=indent, sort_keys=sort_keys) + '\n')


def write_jsonl(file: str, rows: Sequence[Any]) -> None:
  """One strictly valid JSON object per line (strict_json), atomic like write_json."""
  write_text(file, ''.join(json.dumps(strict_json(row), ensure_ascii=False, allow_nan=False) +
                           '\n' for row in rows))


def strict_json(x: Any) -> Any:
  """clean(x) with NaN and infinities as null: strict JSON (RFC 8259 has no NaN)."""
  x = clean(x)
  if isinstance(x, dict):
    return {k: strict_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [strict_json(v) for v in x]
  return None if isinstance(x, float) and not math.isfinite(x) else x


def write_text(file: str, text: str) -> None:
  """Atomic like write_json: an interrupted write leaves the old file, never half a page."""
  paths.write_atomic(file, text)


def read_jsonl(file: str) -> list[Any]:
  """The objects of a JSON-lines file written by write_jsonl."""
  try:
    with paths.open_file(file, encoding='utf-8') as f:
      return [json.loads(line) for line in f if line.strip()]
  except OSError as e:
    raise WorkdirError(f'cannot read {file} ({e.strerror})') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{file} is not valid JSON lines ({e}); rewrite it (rerun the command '
                       'that wrote it)') from None


def read_json(file: str) -> Any:
  try:
    with paths.open_file(file, encoding='utf-8') as f:
      return json.load(f)
  except OSError as e:
    raise WorkdirError(f'cannot read {file} ({e.strerror})') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{file} is not valid JSON ({e}); rewrite it (rerun the command that '
                       'wrote it)') from None


def read_optional_json(file: str) -> Any:
  """The file's JSON, or None when it does not exist."""
  return read_json(file) if paths.exists(file) else None


# ---------------------------------------------------------------- preference.csv
