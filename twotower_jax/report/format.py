"""What every part of the report shares: number formatting, content blocks, csv helpers.

The report is built once as a list of blocks (heading, paragraph, list, table,
figure, token view) and rendered twice (render.py), to Markdown and to HTML, so
the two never disagree. NaN prints as 'n/a'.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from twotower_jax import workdir as workdir_lib

SPACE_PIECE = '\u2581'  # SentencePiece word-boundary marker '▁'
TOP_K = workdir_lib.TOP_K


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def num(x: Any, digits: int = 3) -> str:
  """A number for the report: fixed decimals, 'n/a' for None/NaN/inf."""
  if isinstance(x, bool) or not _finite(x):
    return 'n/a'
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f'{float(x):.{digits}f}'


def count(x: Any) -> str:
  """An integer count, 'n/a' when missing."""
  return str(int(x)) if _finite(x) else 'n/a'


def ci(pair: Any, digits: int = 3) -> str:
  """'[lo, hi]' or 'n/a'."""
  if not isinstance(pair, (list, tuple)) or len(pair) != 2:
    return 'n/a'
  if not (_finite(pair[0]) and _finite(pair[1])):
    return 'n/a'
  return f'[{num(pair[0], digits)}, {num(pair[1], digits)}]'


def md_escape(text: str) -> str:
  """Makes arbitrary text (a piece) safe inside a Markdown table cell or paragraph."""
  text = str(text).replace('\\', '\\\\').replace('\n', ' ').replace('\r', ' ')
  return re.sub(r'([|`*_<>\[\]#&])', r'\\\1', text)


def show_piece(piece: str) -> str:
  """A piece for a table: '▁' kept visible, control characters named."""
  return ''.join(c if c.isprintable() else f'\\x{ord(c):02x}' for c in str(piece)) or "''"


# ---------------------------------------------------------------- blocks


def H(level: int, text: str):  # pylint: disable=invalid-name
  return ('h', level, text)


def P(text: str):  # pylint: disable=invalid-name
  return ('p', text)


def UL(items: Sequence[str]):  # pylint: disable=invalid-name
  return ('ul', list(items))


def TABLE(header: Sequence[str], rows: Sequence[Sequence[str]]):  # pylint: disable=invalid-name
  return ('table', list(header), [list(r) for r in rows])


def FIG(rel_path: str, caption: str):  # pylint: disable=invalid-name
  return ('fig', rel_path, caption)


def WHY(text: str):  # pylint: disable=invalid-name
  """A skipped section: one line saying why."""
  return ('p', f'Not shown: {text}.')


# ---------------------------------------------------------------- statistics from the csv


def _scored(prefs: dict[str, Any], summary: dict[str, Any]) -> np.ndarray:
  """Items the statistics use: count >= min_count (summary), at least 1."""
  min_count = summary.get('min_count', 1)
  min_count = float(min_count) if _finite(min_count) else 1.0
  return prefs['count'] >= max(min_count, 1.0)


def _pref_col(prefs: dict[str, Any], est: str) -> np.ndarray | None:
  col = prefs.get(f'{est}_pref')
  return col if isinstance(col, np.ndarray) else None


def _tower_keys(top) -> list[str]:
  return sorted(top, key=lambda k: int(re.sub(r'\D', '', k) or 0))


def leaning_items(top: dict[str, Any], key: str, n_towers: int) -> list[dict[str, Any]]:
  """The top items of one tower; with two towers only those whose preference has its sign.

  (A tower-1 list padded with items of positive preference would show tower-0 items.)
  """
  items = list(top.get(key) or [])[:TOP_K]
  if n_towers <= 2 and key in ('tower_0', 'tower_1'):
    sign = 1.0 if key == 'tower_0' else -1.0
    items = [it for it in items if _finite(it.get('pref')) and sign * float(it['pref']) > 0]
  return items
