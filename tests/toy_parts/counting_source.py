"""A toy data source: documents that count up in words ('one two three ...'), some reversed."""

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax.data import corpus

WORDS = 'one two three four five six seven eight nine ten eleven twelve'.split()


def check(d: ml_collections.ConfigDict) -> None:
  if d.source == 'toy_counting' and d.vocab_size > 64:
    raise config_lib.ConfigError('data.source=toy_counting supports data.vocab_size <= 64')


@corpus.register('toy_counting', check=check)
def counting(d: ml_collections.ConfigDict) -> corpus.Corpus:
  docs = []
  for i in range(40):
    words = (WORDS * 4)[i % 12:i % 12 + 30]
    docs.append(' '.join(reversed(words) if i % 3 == 0 else words))
  return corpus.split([f'count{i}' for i in range(len(docs))], docs, d.val_fraction)
