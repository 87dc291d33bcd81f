"""Prepared token shards (python -m twotower_jax.prepare, data.prepared): the same windows,
batches and training as the corpus read at start; resumable; bad input is one line."""

import os

import numpy as np
import pytest

from tests.conftest import cli_overrides, run_module, tiny_config
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import preparation
from twotower_jax.data import shards
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.data import windows as data_lib
from twotower_jax.train import loop as train
from twotower_jax.train import setup as setup_lib


@pytest.fixture(scope='module')
def prepared(small_corpus_dir, tmp_path_factory):
  """(config, prepared folder) of the small corpus, prepared by two worker processes."""
  config = tiny_config(small_corpus_dir)
  out = str(tmp_path_factory.mktemp('prepared') / 'data')
  preparation.prepare(config, out, workers=2)
  return config, out


def test_shards_hold_the_windows_the_corpus_packs(prepared, tmp_path):
  config, out = prepared
  config = config.copy_and_resolve_references()
  corpus = corpus_lib.load(config.data)
  sp = tokenizer_lib.load(os.path.join(out, shards.TOKENIZER))
  splits = data_lib.make_splits(sp, corpus.train_docs, corpus.val_docs, config.data.seq_len)
  config.data.prepared = out
  opened = shards.open_prepared(config.data)
  assert np.array_equal(opened.windows('train')[:], splits.train_windows)
  assert np.array_equal(opened.windows('val')[:], splits.val_windows)
  assert np.array_equal(opened.train_token_counts(), splits.train_token_counts)
  manifest = opened.manifest
  assert manifest['splits']['train']['documents'] == len(corpus.train_docs)
  assert manifest['splits']['val']['tokens'] == int(sum(len(i) for i in tokenizer_lib.encode_docs(
      sp, corpus.val_docs)))
  assert manifest['tokenizer_sha256'] == tokenizer_lib.file_digest(opened.tokenizer_path)
  assert not os.path.exists(os.path.join(out, preparation.PROGRESS))


def test_an_interrupted_preparation_resumes_to_the_same_shards(prepared, tmp_path, monkeypatch):
  config, whole = prepared
  config = config.copy_and_resolve_references()
  monkeypatch.setattr(shards, 'SHARD_WINDOWS', 256)  # several shards from a small corpus
  out = str(tmp_path / 'data')
  reports = []

  def crash_after_two_shards(line):
    reports.append(line)
    if len(reports) == 2:
      raise KeyboardInterrupt  # as Ctrl-C between two shards
  with pytest.raises(KeyboardInterrupt):
    preparation.prepare(config, out, workers=1, report=crash_after_two_shards)
  assert os.path.exists(os.path.join(out, preparation.PROGRESS))
  lines = []
  preparation.prepare(config, out, workers=1, report=lines.append)
  first = int(lines[0].split(': ')[1].split(' windows')[0].replace(',', ''))
  assert first > 2 * 256, lines  # it went on after the two stored shards, not from the start
  config.data.prepared = whole
  ref = shards.open_prepared(config.data)
  config.data.prepared = out
  got = shards.open_prepared(config.data)
  for split in shards.SPLITS:
    assert np.array_equal(got.windows(split)[:], ref.windows(split)[:]), split
  assert np.array_equal(got.train_token_counts(), ref.train_token_counts())


@pytest.mark.slow
def test_training_from_shards_is_training_from_the_corpus(prepared, tmp_path):
  """Same tokenizer file, so the same ids: the losses and the final parameters are equal,
  and a process reads only the rows of each batch it holds."""
  config, out = prepared
  config = config.copy_and_resolve_references()
  config.train.steps, config.train.eval_every, config.train.checkpoint_every = 4, 4, 4
  direct = str(tmp_path / 'direct')
  os.makedirs(direct)
  with open(os.path.join(out, shards.TOKENIZER), 'rb') as f, open(
      workdir_lib.path(direct, workdir_lib.TOKENIZER), 'wb') as g:
    g.write(f.read())  # the corpus run uses the prepared tokenizer instead of training one
  a = train.train_and_evaluate(config, direct)
  from_shards = config.copy_and_resolve_references()
  from_shards.data.prepared = out
  b = train.train_and_evaluate(from_shards, str(tmp_path / 'shards'))
  assert a['eval']['loss'] == b['eval']['loss']
  losses = [[l['loss'] for l in workdir_lib.read_metrics(w) if l['kind'] == 'train']
            for w in (direct, str(tmp_path / 'shards'))]
  assert losses[0] == losses[1]
  setup = setup_lib.build(from_shards, str(tmp_path / 'shards'), train_tokenizer=False)
  assert setup.corpus is None and isinstance(setup.splits.train_windows, shards.Windows)
  assert 'bits_per_byte' in b['eval'] and 0 < b['eval']['bits_per_byte'] < 8


def test_prepared_data_that_does_not_fit_the_run_is_one_line(prepared, tmp_path):
  config, out = prepared
  other = config.copy_and_resolve_references()
  other.data.seq_len = other.model.max_len = 16
  other.data.prepared = out
  workdir = str(tmp_path / 'run')
  proc = run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                    *cli_overrides(other), timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count('\n') == 1 and 'data.seq_len=32' in proc.stderr, proc.stderr
  assert not os.path.exists(workdir)
  missing = config.copy_and_resolve_references()
  missing.data.prepared = str(tmp_path / 'nothing')
  with pytest.raises(corpus_lib.CorpusError, match='python -m twotower_jax.prepare'):
    shards.open_prepared(missing.data)


def test_prepare_refuses_a_folder_of_other_files(prepared, tmp_path):
  config, _ = prepared
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(corpus_lib.CorpusError, match='holds other files'):
    preparation.prepare(config, str(tmp_path), workers=1)
  assert os.listdir(tmp_path) == ['notes.txt']


def test_the_prepare_command_wants_an_out_folder():
  proc = run_module('twotower_jax.prepare', '--config=configs/default.py', timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith('error: --out=DIR is required')
  assert proc.stderr.count('\n') == 1, proc.stderr


def test_prepared_windows_index_like_the_array_they_replace(prepared):
  config, out = prepared
  config = config.copy_and_resolve_references()
  config.data.prepared = out
  windows = shards.open_prepared(config.data).windows('val')
  full = np.asarray(windows)
  assert full.dtype == np.int32 and full.shape == windows.shape
  for index in (3, -1, slice(2, 7), slice(None, None, 5), np.array([9, 0, 4]),
                (slice(0, 4), slice(1, None)), (5, slice(None, 3))):
    assert np.array_equal(windows[index], full[index]), index
  assert np.array_equal(np.concatenate([windows, full[:2]]), np.concatenate([full, full[:2]]))
  with pytest.raises(IndexError):
    windows[len(windows)]
