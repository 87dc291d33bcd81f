"""data.source=text: UTF-8 files by glob, one document per file."""

from __future__ import annotations

import glob
import os

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data.corpus import Corpus, CorpusError


def _expand(pattern: str, field: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise CorpusError(f'data.{field}={pattern!r} matches no files; check the pattern')
  return paths


def _read_doc(path: str) -> str:
  doc = corpus_lib.read_text_file(path)
  if not doc.strip():
    raise CorpusError(f'{path}: empty file; remove it from the glob')
  return doc


def _read_docs(paths: list[str]) -> list[str]:
  docs = [corpus_lib.read_text_file(p) for p in paths]
  empty = [p for p, d in zip(paths, docs) if not d.strip()]
  if empty:
    raise CorpusError(f'{empty[0]}: empty file; remove it from the glob')
  return docs


def _split_paths(data_config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(training files, held-out files): text_val_glob's, or a fraction of whole files."""
  paths = _expand(data_config.text_glob, 'text_glob')
  if data_config.text_val_glob:
    val_paths = _expand(data_config.text_val_glob, 'text_val_glob')
    train_paths = [p for p in paths if p not in set(val_paths)]
    if not train_paths:
      raise CorpusError('data.text_glob has no files left after removing data.text_val_glob')
    return train_paths, val_paths
  if len(paths) < 2:
    raise CorpusError(f'data.text_glob={data_config.text_glob!r} matches one file; held-out '
                      'documents are whole files, so give at least two or set data.text_val_glob')
  val = set(corpus_lib.held_out_indices(len(paths), data_config.val_fraction))
  return ([p for i, p in enumerate(paths) if i not in val],
          [p for i, p in enumerate(paths) if i in val])


def text_documents(data_config: ml_collections.ConfigDict) -> corpus_lib.Documents:
  """The files of text_corpus's split, each read when needed."""
  train_paths, val_paths = _split_paths(data_config)
  return corpus_lib.Documents(train_paths, val_paths, _read_doc)


def check(data_config: ml_collections.ConfigDict) -> None:
  if data_config.source == 'text' and not data_config.text_glob:
    raise config_lib.ConfigError('data.source=text needs --config.data.text_glob=PATTERN')


@corpus_lib.register('text', check=check, documents=text_documents)
def text_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """Plain UTF-8 files by glob, one document per file."""
  train_paths, val_paths = _split_paths(data_config)
  return Corpus(_read_docs(train_paths), _read_docs(val_paths), train_paths, val_paths)
