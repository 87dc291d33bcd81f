"""data.source=tfds: TFDS datasets prepared in array_record format, read without TensorFlow.

`data.tfds_name` names one dataset or several, comma-separated (the original trained on
WikiText and BookCorpus together: e.g. `wikipedia/20230601.en,pg19`); their documents
follow one another in each split. `data.tfds_text_key`, `tfds_train_split` and
`tfds_val_split` hold one value for every dataset or one per dataset, comma-separated;
`data.tfds_max_docs` bounds each dataset's training documents.
"""

from __future__ import annotations

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data.corpus import Corpus, CorpusError


PER_DATASET = ('tfds_text_key', 'tfds_train_split', 'tfds_val_split')


def datasets(data_config: ml_collections.ConfigDict) -> list[dict[str, str]]:
  """One dict per dataset of data.tfds_name: its `name` and its PER_DATASET fields."""
  names = [n.strip() for n in data_config.tfds_name.split(',')]
  out = [{'name': n} for n in names]
  for field in PER_DATASET:
    values = [v.strip() for v in str(data_config[field]).split(',')]
    if len(values) not in (1, len(names)) or not all(values):
      raise config_lib.ConfigError(
          f'data.{field}={data_config[field]!r} needs one value or one per dataset of '
          f'data.tfds_name ({len(names)}: {", ".join(names)}), comma-separated')
    for d, v in zip(out, values * len(names) if len(values) == 1 else values):
      d[field] = v
  return out


def _tfds_split(data_config: ml_collections.ConfigDict, name: str, key: str, split: str,
                limit: int) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = {'data_dir': data_config.tfds_data_dir} if data_config.tfds_data_dir else {}
  try:
    source = tfds.data_source(name, split=split, **kwargs)
  except Exception as e:  # tfds raises several types for a missing dataset
    raise CorpusError(
        f'TFDS dataset {name!r} split {split!r} is not prepared in '
        f'{data_config.tfds_data_dir or "the TFDS data dir"} ({type(e).__name__}); prepare it '
        'on a machine with internet (docs/DATA.md, tfds)') from None
  n = len(source) if not limit else min(limit, len(source))
  docs = []
  for i in range(n):
    example = source[i]
    if key not in example:
      raise CorpusError(f'TFDS {name!r} has no feature {key!r} (it has {sorted(example)}); '
                        'set data.tfds_text_key (one per dataset, comma-separated)')
    value = example[key]
    docs.append(value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value))
  return docs


def check(data_config: ml_collections.ConfigDict) -> None:
  if data_config.source != 'tfds':
    return
  if not data_config.tfds_name or not all(n.strip() for n in data_config.tfds_name.split(',')):
    raise config_lib.ConfigError(f'data.source=tfds needs --config.data.tfds_name=NAME[,NAME...] '
                                 f'(got {data_config.tfds_name!r})')
  datasets(data_config)


@corpus_lib.register('tfds', check=check)
def tfds_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """The TFDS datasets of data.tfds_name, prepared in array_record format, one after the
  other; documents are named split[i], or name:split[i] when there are several."""
  parts = {'train': ([], []), 'val': ([], [])}
  sets = datasets(data_config)
  several = len(sets) > 1
  for d in sets:
    for part, split, limit in (('train', d['tfds_train_split'], data_config.tfds_max_docs),
                               ('val', d['tfds_val_split'], 0)):
      docs = _tfds_split(data_config, d['name'], d['tfds_text_key'], split, limit)
      prefix = f'{d["name"]}:' if several else ''
      parts[part][0].extend(docs)
      parts[part][1].extend(f'{prefix}{split}[{i}]' for i in range(len(docs)))
  (train, train_names), (val, val_names) = parts['train'], parts['val']
  return Corpus(train, val, train_names, val_names)
