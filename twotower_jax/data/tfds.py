"""data.source=tfds: a TFDS dataset prepared in array_record format, read without TensorFlow."""

from __future__ import annotations

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data.corpus import Corpus, CorpusError


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


def check(data_config: ml_collections.ConfigDict) -> None:
  if data_config.source == 'tfds' and not data_config.tfds_name:
    raise config_lib.ConfigError('data.source=tfds needs --config.data.tfds_name=NAME')


@corpus_lib.register('tfds', check=check)
def tfds_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """A TFDS dataset prepared in array_record format, read without TensorFlow."""
  train = _tfds_split(data_config, data_config.tfds_train_split, data_config.tfds_max_docs)
  val = _tfds_split(data_config, data_config.tfds_val_split, 0)
  return Corpus(train, val,
                [f'{data_config.tfds_train_split}[{i}]' for i in range(len(train))],
                [f'{data_config.tfds_val_split}[{i}]' for i in range(len(val))])
