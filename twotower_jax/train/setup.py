"""What training and every later reader of a workdir build from config + workdir.

`check_config` validates a config against the schema and every registry (data
sources, tower types, gates); `build` makes the mesh, reads the corpus, trains the
tokenizer on first use (process 0) and packs the windows, and builds the model. With
data.prepared it opens the prepared shards instead: no corpus, nothing tokenised.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections

from twotower_jax import config as config_lib
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import shards
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.data import windows as data_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.train import sharding as sharding_lib


def check_config(config: ml_collections.ConfigDict) -> None:
  """The schema's checks, then each registry's (data.source, model.tower_type, model.gate),
  after importing the modules in config.imports (they may register more names)."""
  config_lib.import_parts(config)
  config_lib.validate(config)
  corpus_lib.check_config(config.data)
  model_lib.check_config(config)


@dataclasses.dataclass
class Setup:
  """Everything built from config + workdir that both training and analysis need."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  tokenizer: Any
  splits: data_lib.Splits
  corpus: corpus_lib.Corpus | None  # None when training from data.prepared
  model: model_lib.TwoTowerLM


def build(config: ml_collections.ConfigDict, workdir: str, train_tokenizer: bool = True,
          devices: Sequence[jax.Device] | None = None) -> Setup:
  """Mesh (over `devices`, default all), corpus, tokenizer (trained on first use), packed
  splits and model."""
  mesh = sharding_lib.make_mesh(config, devices)
  if config.data.prepared:
    return _build_prepared(config, workdir, train_tokenizer, mesh)
  corpus = corpus_lib.load(config.data)
  if train_tokenizer and jax.process_index() == 0:
    created = not paths.exists(workdir)  # bad input before this point leaves no trace
    paths.makedirs(workdir)
    try:
      tokenizer_lib.train_or_load(corpus.train_docs, workdir, config.data.vocab_size,
                                  config.data.tokenizer_type)
    except Exception:
      if created and not paths.is_remote(workdir) and not os.listdir(workdir):
        os.rmdir(workdir)
      raise
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('tokenizer_ready')
  sp = tokenizer_lib.load(workdir_lib.path(workdir, workdir_lib.TOKENIZER))
  splits = data_lib.make_splits(sp, corpus.train_docs, corpus.val_docs, config.data.seq_len)
  model = model_lib.build(config, sp.get_piece_size())
  return Setup(config, mesh, sp, splits, corpus, model)


def _build_prepared(config: ml_collections.ConfigDict, workdir: str, train_tokenizer: bool,
                    mesh: jax.sharding.Mesh) -> Setup:
  """Setup from data.prepared: its tokenizer copied into the workdir on first use (process 0),
  its windows opened, not read."""
  prepared = shards.open_prepared(config.data)
  path = workdir_lib.path(workdir, workdir_lib.TOKENIZER)
  if train_tokenizer and jax.process_index() == 0 and not paths.exists(path):
    paths.makedirs(workdir)
    paths.write_atomic(path, paths.read_bytes(prepared.tokenizer_path))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('tokenizer_ready')
  sp = tokenizer_lib.load(path)
  if tokenizer_lib.file_digest(path) != prepared.manifest['tokenizer_sha256']:
    raise tokenizer_lib.TokenizerError(
        f'{path} is not the tokenizer of data.prepared={config.data.prepared!r}; use a new '
        '--workdir, or the prepared data this workdir was trained with')
  splits = data_lib.Splits(prepared.windows('train'), prepared.windows('val'),
                           prepared.train_token_counts())
  return Setup(config, mesh, sp, splits, None, model_lib.build(config, sp.get_piece_size()))
