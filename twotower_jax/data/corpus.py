"""Corpora: whole documents, split into training and held-out documents.

A data source is a function `config.data -> Corpus` registered by name (`register`);
`data.source` selects it. A source may also register `documents`, the same split as names
read one at a time, so preparation (data/preparation.py) streams corpora larger than memory. A source may also register a `check` of its own config
fields, run with the rest of the config validation, and `target_weights`: a training
loss weight per token id (e.g. the planted source's `data.planted_loss_class`). The
built-in sources are one module each (sotu.py, text.py, tfds.py, planted.py); a new
one is one more file.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import errors


class CorpusError(errors.UserError):
  """A corpus that cannot be read; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Held-out documents never appear in train_docs (split by whole document)."""
  train_docs: list[str]
  val_docs: list[str]
  train_names: list[str]
  val_names: list[str]


@dataclasses.dataclass(frozen=True)
class Documents:
  """A corpus's split as document names, each read when needed (`read(name)` -> text)."""
  train_names: list[str]
  val_names: list[str]
  read: Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class Source:
  """A registered data source: `load` builds the corpus, `check` validates its fields,
  `target_weights(config.data, sp)` optionally gives a training-loss weight per token id
  (float[V], or None for every target at 1)."""
  load: Callable[[ml_collections.ConfigDict], Corpus]
  check: Callable[[ml_collections.ConfigDict], None] | None = None
  target_weights: Callable[[ml_collections.ConfigDict, Any], np.ndarray | None] | None = None
  documents: Callable[[ml_collections.ConfigDict], Documents] | None = None


SOURCES: dict[str, Source] = {}


def register(name: str, check: Callable[[ml_collections.ConfigDict], None] | None = None,
             target_weights: Callable[[ml_collections.ConfigDict, Any], np.ndarray | None]
             | None = None,
             documents: Callable[[ml_collections.ConfigDict], Documents] | None = None):
  """Decorator: `@register('name')` on a function config.data -> Corpus."""
  def wrap(fn):
    SOURCES[name] = Source(fn, check, target_weights, documents)
    return fn
  return wrap


def documents(data_config: ml_collections.ConfigDict) -> Documents:
  """The source's documents one at a time where it streams them, else its loaded corpus."""
  if data_config.source not in SOURCES:
    raise config_lib.unknown_name('data.source', data_config.source, SOURCES)
  source = SOURCES[data_config.source]
  if source.documents is not None:
    return source.documents(data_config)
  corpus = load(data_config)
  texts = dict(zip(corpus.train_names + corpus.val_names, corpus.train_docs + corpus.val_docs))
  return Documents(list(corpus.train_names), list(corpus.val_names), texts.__getitem__)


def target_weights(data_config: ml_collections.ConfigDict, sp) -> np.ndarray | None:
  """float32[V]: the source's training-loss weight per target id, or None (all 1).

  The train step multiplies each target's loss weight by w_V[target]; PAD stays 0.
  """
  source = SOURCES.get(data_config.source)
  if source is None or source.target_weights is None:
    return None
  w_V = source.target_weights(data_config, sp)
  if w_V is None:
    return None
  w_V = np.asarray(w_V, np.float32)
  if w_V.shape != (sp.get_piece_size(),) or not np.all(np.isfinite(w_V)) or np.any(w_V < 0):
    raise CorpusError(f'data.source={data_config.source!r} gave target weights of shape '
                      f'{w_V.shape}; need {sp.get_piece_size()} finite values >= 0')
  if not w_V.any():
    raise CorpusError(f'data.source={data_config.source!r}: no target carries loss (every '
                      'target weight is 0); check the source\'s loss settings')
  return w_V


def check_config(data_config: ml_collections.ConfigDict) -> None:
  """data.source names a registered source; every source checks its own fields."""
  if data_config.source not in SOURCES:
    raise config_lib.unknown_name('data.source', data_config.source, SOURCES)
  for source in SOURCES.values():
    if source.check is not None:
      source.check(data_config)


def load(data_config: ml_collections.ConfigDict) -> Corpus:
  if data_config.source not in SOURCES:
    raise config_lib.unknown_name('data.source', data_config.source, SOURCES)
  corpus = SOURCES[data_config.source].load(data_config)
  if not corpus.train_docs or not any(d.strip() for d in corpus.train_docs):
    raise CorpusError(f'data.source={data_config.source!r} gave no training text; '
                      'point it at non-empty documents')
  if not corpus.val_docs:
    raise CorpusError(f'data.source={data_config.source!r} gave no held-out documents; '
                      'add documents or raise data.val_fraction')
  return corpus


_MARKER_RE = re.compile(r'\[[^\[\]\n]{0,200}\]')
_SPACES_RE = re.compile(r'[ \t]{2,}')


def strip_markers(text: str) -> str:
  """Removes bracketed stage directions such as [Applause] or [Laughter]."""
  text = _MARKER_RE.sub('', text)
  text = _SPACES_RE.sub(' ', text)
  return '\n'.join(line.strip() for line in text.splitlines()).strip()


def held_out_indices(n_docs: int, fraction: float) -> list[int]:
  """Evenly spaced document indices (whole documents, spread over the collection)."""
  n_val = max(1, round(n_docs * fraction))
  if n_docs < 2:
    return []
  n_val = min(n_val, n_docs - 1)
  stride = n_docs / n_val
  return sorted({int(stride * i + stride / 2) for i in range(n_val)})


def split(names: list[str], docs: list[str], fraction: float) -> Corpus:
  val = set(held_out_indices(len(docs), fraction))
  return Corpus(
      train_docs=[d for i, d in enumerate(docs) if i not in val],
      val_docs=[d for i, d in enumerate(docs) if i in val],
      train_names=[n for i, n in enumerate(names) if i not in val],
      val_names=[n for i, n in enumerate(names) if i in val])


def read_text_file(path: str) -> str:
  """UTF-8 text; a binary file (NUL bytes) or one with bad bytes is an error that names it."""
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    nul = text.find('\0')
    if nul >= 0:
      raise CorpusError(f'{path}: a binary file, not text (NUL byte at character {nul}); '
                        'remove it from the glob')
    return text
  except UnicodeDecodeError as e:
    raise CorpusError(f'{path}: not UTF-8 text (byte {e.start}); convert it with '
                      '`iconv -t utf-8` or remove it from the glob') from None
  except OSError as e:
    raise CorpusError(f'{path}: cannot read ({e.strerror})') from None
