"""The workdir: every file a run and its analysis write, their names and formats.

The one owner of the layout. Training, the analysis, the report and `--compare`
find files through these names and read or write them through these functions:

  DIR/config.json                  the resolved config (`write_config`, `read_config`)
  DIR/tokenizer.model              SentencePiece, trained on first use
  DIR/checkpoints/<step>/          Orbax: state, data, meta (train/checkpoints.py)
  DIR/metrics.jsonl                one JSON object per line with `kind` (`read_metrics`)
  DIR/tensorboard/                 the same scalars as event files
  DIR/analysis/                    preference.csv, summary.json, token_view.json,
                                   structural_probe.json, probe/, report.md,
                                   report.html, figures/, compare/, steps/<step>/,
                                   over_training.json, over_training.md
  DIR/generate/                    generations.jsonl (one sample per line, `write_jsonl`),
                                   generations.html (python -m twotower_jax.generate)
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import errors

CONFIG_JSON = 'config.json'
TOKENIZER = 'tokenizer.model'
CHECKPOINTS = 'checkpoints'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'
ANALYSIS = 'analysis'
# Inside DIR/analysis/.
PREFERENCE_CSV = 'preference.csv'
SUMMARY_JSON = 'summary.json'
TOKEN_VIEW_JSON = 'token_view.json'
STRUCT_JSON = 'structural_probe.json'
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
# preference.csv: the leading columns, then per estimator EST_t0..EST_t{N-1}, EST_pref,
# EST_pref_lo, EST_pref_hi (EST_best for N > 2), EST_<extra> per extra value, and
# planted_class for planted corpora. An estimator is a prefix that has an EST_pref column.
LEADING_COLUMNS = ('token_id', 'piece', 'count', 'word_class', 'upos')
TEXT_COLUMNS = ('piece', 'word_class', 'upos', 'planted_class')


class WorkdirError(errors.UserError):
  """A workdir file that is missing or unreadable; the message says which and what to do."""


def path(workdir: str, *names: str) -> str:
  return os.path.join(os.path.abspath(workdir), *names)


def analysis_dir(workdir: str) -> str:
  return path(workdir, ANALYSIS)


def generate_dir(workdir: str) -> str:
  return path(workdir, GENERATE)


# ---------------------------------------------------------------- config.json


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Written to a temporary file and renamed, so a kill never leaves half a file."""
  write_json(path(workdir, CONFIG_JSON), config_lib.to_dict(config), indent=2, sort_keys=True)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (base_config() + config.json)."""
  file = path(workdir, CONFIG_JSON)
  if not os.path.exists(file):
    raise WorkdirError(f'{file} is missing; --workdir must be a directory written by '
                       'python -m twotower_jax.main')
  return config_lib.from_dict(read_json(file))


# ---------------------------------------------------------------- metrics.jsonl


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All complete lines of DIR/metrics.jsonl (a torn last line is skipped)."""
  out = []
  file = path(workdir, METRICS)
  if not os.path.exists(file):
    return out
  with open(file) as f:
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
  with open(path(workdir, METRICS), 'a') as f:
    f.write(json.dumps(line) + '\n')


def rewrite_metrics(workdir: str, lines: Sequence[dict[str, Any]]) -> None:
  """Replaces DIR/metrics.jsonl atomically (a resumed run drops the lines it will redo)."""
  file = path(workdir, METRICS)
  tmp = file + '.tmp'
  with open(tmp, 'w') as f:
    for line in lines:
      f.write(json.dumps(line) + '\n')
  os.replace(tmp, file)


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
  """Atomic: written beside the target and renamed over it."""
  tmp = file + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(clean(obj), f, indent=indent, sort_keys=sort_keys)
    f.write('\n')
  os.replace(tmp, file)


def write_jsonl(file: str, rows: Sequence[Any]) -> None:
  """One JSON object per line, atomic like write_json."""
  tmp = file + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(clean(row), ensure_ascii=False) + '\n')
  os.replace(tmp, file)


def read_jsonl(file: str) -> list[Any]:
  """The objects of a JSON-lines file written by write_jsonl."""
  try:
    with open(file, encoding='utf-8') as f:
      return [json.loads(line) for line in f if line.strip()]
  except OSError as e:
    raise WorkdirError(f'cannot read {file} ({e.strerror})') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{file} is not valid JSON lines ({e}); rewrite it (rerun the command '
                       'that wrote it)') from None


def read_json(file: str) -> Any:
  try:
    with open(file, encoding='utf-8') as f:
      return json.load(f)
  except OSError as e:
    raise WorkdirError(f'cannot read {file} ({e.strerror})') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{file} is not valid JSON ({e}); rewrite it (rerun the command that '
                       'wrote it)') from None


def read_optional_json(file: str) -> Any:
  """The file's JSON, or None when it does not exist."""
  return read_json(file) if os.path.exists(file) else None


# ---------------------------------------------------------------- preference.csv


def write_preference_csv(file: str, pieces: Sequence[str], classes: dict[str, np.ndarray],
                         results: dict[str, dict[str, Any]],
                         planted_V: np.ndarray | None = None) -> None:
  """One row per vocabulary item; values are 'nan' where the item was never scored."""
  vocab = len(pieces)
  count = next(iter(results.values()))['count'] if results else np.zeros(vocab)
  header, cols = list(LEADING_COLUMNS), []
  for est, res in results.items():
    n = res['mean_NxV'].shape[0]
    for k in range(n):
      header.append(f'{est}_t{k}')
      cols.append(res['mean_NxV'][k])
    header += [f'{est}_pref', f'{est}_pref_lo', f'{est}_pref_hi']
    cols += [res['pref'], res['pref_lo'], res['pref_hi']]
    if n > 2:
      header.append(f'{est}_best')
      cols.append(np.where(res['count'] > 0, res['best'], -1))
    for name, values in res.get('extras', {}).items():
      header.append(f'{est}_{name}')
      cols.append(values)
  if planted_V is not None:
    header.append('planted_class')
    cols.append(planted_V)
  tmp = file + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(header)
    for v in range(vocab):
      row = [v, pieces[v], int(count[v]), classes['word_class'][v], classes['upos'][v]]
      for c in cols:
        x = c[v]
        if isinstance(x, (np.integer, int)):
          row.append(int(x))
        else:
          x = float(x)
          row.append('nan' if (not math.isfinite(x) or count[v] == 0) else f'{x:.6g}')
      w.writerow(row)
  os.replace(tmp, file)


def _float(text: Any) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return float('nan')


def read_preferences(file: str) -> dict[str, Any]:
  """preference.csv as columns: text columns as lists of str, the rest as float arrays.

  Also `_fields` (the header) and `_estimators` ({name: number of towers}).
  """
  if not os.path.exists(file):
    raise WorkdirError(f'{file} is missing; run the analysis first '
                       '(python -m twotower_jax.analyze --workdir=DIR)')
  with open(file, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    fields = list(reader.fieldnames or [])
    rows = list(reader)
  for need in ('token_id', 'piece', 'count'):
    if need not in fields:
      raise WorkdirError(f'{file} has no {need!r} column; rerun the analysis to rewrite it')
  cols: dict[str, Any] = {}
  for name in fields:
    vals = [r.get(name) or '' for r in rows]
    cols[name] = vals if name in TEXT_COLUMNS else np.array([_float(v) for v in vals])
  cols['_fields'] = fields
  cols['_estimators'] = estimator_columns(fields, file)
  return cols


def estimator_columns(fields: Sequence[str], file: str = PREFERENCE_CSV) -> dict[str, int]:
  """{estimator: number of towers}: every EST with an EST_pref column and EST_t0..t{N-1}."""
  out = {}
  names = set(fields)
  for name in fields:
    if not name.endswith('_pref'):
      continue
    est = name[:-len('_pref')]
    n = 0
    while f'{est}_t{n}' in names:
      n += 1
    if n < 2:
      raise WorkdirError(f'{file}: estimator {est!r} has {n} tower columns ({est}_t0..); '
                         'rerun the analysis to rewrite it')
    out[est] = n
  return out


def tower_values(cols: dict[str, Any], est: str) -> np.ndarray:
  """values_IxN: estimator `est`'s per-tower columns of preference.csv."""
  n = cols['_estimators'][est]
  return np.stack([cols[f'{est}_t{k}'] for k in range(n)], axis=1)
