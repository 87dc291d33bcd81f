"""DIR/analysis/preference.csv: one row per vocabulary item, written and read back.

The columns: token_id, piece, count, word_class, upos (LEADING_COLUMNS), item_loss when
the analysis measured it, then per estimator EST_t0..EST_t{N-1}, EST_pref, EST_pref_lo,
EST_pref_hi, EST_pref_norm (EST_best for N > 2), EST_<extra> per extra value, and
planted_class for planted corpora. An estimator is a prefix that has an EST_pref column.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

import numpy as np

from twotower_jax import paths
from twotower_jax.workdir import PREFERENCE_CSV, WorkdirError

LEADING_COLUMNS = ('token_id', 'piece', 'count', 'word_class', 'upos')
TEXT_COLUMNS = ('piece', 'word_class', 'upos', 'planted_class')


def write_preference_csv(file: str, pieces: Sequence[str], classes: dict[str, np.ndarray],
                         results: dict[str, dict[str, Any]],
                         planted_V: np.ndarray | None = None,
                         item_loss_V: np.ndarray | None = None) -> None:
  """One row per vocabulary item; values are 'nan' where the item was never scored."""
  vocab = len(pieces)
  count = next(iter(results.values()))['count'] if results else np.zeros(vocab)
  header, cols = list(LEADING_COLUMNS), []
  if item_loss_V is not None:
    header.append('item_loss')
    cols.append(item_loss_V)
  for est, res in results.items():
    n = res['mean_NxV'].shape[0]
    for k in range(n):
      header.append(f'{est}_t{k}')
      cols.append(res['mean_NxV'][k])
    header += [f'{est}_pref', f'{est}_pref_lo', f'{est}_pref_hi']
    cols += [res['pref'], res['pref_lo'], res['pref_hi']]
    if 'pref_norm' in res:
      header.append(f'{est}_pref_norm')
      cols.append(res['pref_norm'])
    if n > 2:
      header.append(f'{est}_best')
      cols.append(np.where(res['count'] > 0, res['best'], -1))
    for name, values in res.get('extras', {}).items():
      header.append(f'{est}_{name}')
      cols.append(values)
  if planted_V is not None:
    header.append('planted_class')
    cols.append(planted_V)
  f = io.StringIO(newline='')  # the rows, then one atomic write
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
  paths.write_atomic(file, f.getvalue())


def _float(text: Any) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return float('nan')


def read_preferences(file: str) -> dict[str, Any]:
  """preference.csv as columns: text columns as lists of str, the rest as float arrays.

  Also `_fields` (the header) and `_estimators` ({name: number of towers}).
  """
  if not paths.exists(file):
    raise WorkdirError(f'{file} is missing; run the analysis first '
                       '(python -m twotower_jax.analyze --workdir=DIR)')
  try:
    with paths.open_file(file, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      fields = list(reader.fieldnames or [])
      rows = list(reader)
  except (UnicodeDecodeError, csv.Error) as e:
    raise WorkdirError(f'{file} is damaged, not a CSV table ({e}); rerun the analysis to '
                       'rewrite it') from None
  for need in ('token_id', 'piece', 'count'):
    if need not in fields:
      raise WorkdirError(f'{file} has no {need!r} column; rerun the analysis to rewrite it')
  _check_rows(file, fields, rows)
  cols: dict[str, Any] = {}
  for name in fields:
    vals = [r.get(name) or '' for r in rows]
    cols[name] = vals if name in TEXT_COLUMNS else np.array([_float(v) for v in vals])
  cols['_fields'] = fields
  cols['_estimators'] = estimator_columns(fields, file)
  return cols


def _check_rows(file: str, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  """WorkdirError for a row cut short (fewer or more cells than the header), token ids not
  0..I-1 in order, or a count that is not a number >= 0: a damaged or truncated file."""
  for i, row in enumerate(rows):
    if None in row or None in row.values() or row['token_id'] != str(i) or not _float(
        row['count']) >= 0:
      raise WorkdirError(f'{file} is damaged at line {i + 2} (want {len(fields)} cells, token '
                         f'id {i}, a count >= 0: cut or edited); rerun the analysis to rewrite it')


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
