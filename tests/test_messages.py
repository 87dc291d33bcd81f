"""Error messages point the right way: the fix they give works, a binary file is named as one,
a damaged checkpoint is called damaged without library object reprs (docs/RELIABILITY.md,
"Bad input catalogue")."""

import glob
import os
import re
import shutil

import pytest

from conftest import snapshot
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import loop as train


def refused(config, workdir, error, match):
  existed = os.path.exists(workdir)
  before = snapshot(workdir) if existed else None
  with pytest.raises(error) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert '\n' not in message and match in message, message
  assert os.path.exists(workdir) == existed and (not existed or snapshot(workdir) == before)
  return message


def test_a_vocabulary_too_small_for_the_characters_says_raise_it(tiny, tmp_path):
  config = tiny(**{'data.vocab_size': 20})
  message = refused(config, str(tmp_path / 'run'), tokenizer_lib.TokenizerError,
                    'data.vocab_size=20 is too small for this corpus')
  need = int(re.search(r'raise data.vocab_size to (\d+) or more', message).group(1))
  assert need > 20
  docs = corpus_lib.load(config.data).train_docs
  tokenizer_lib.train(docs, str(tmp_path / 'sp.model'), need)  # the advice works
  assert tokenizer_lib.load(str(tmp_path / 'sp.model')).get_piece_size() == need


def test_a_corpus_too_small_for_any_vocabulary_says_give_more_text(tiny, tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for name, text in (('a.txt', 'ab ba ab\n'), ('b.txt', 'ba ab\n'), ('c.txt', 'ab\n')):
    (corpus / name).write_text(text)
  message = refused(tiny(**{'data.text_glob': str(corpus / '*.txt'), 'data.val_fraction': 0.34}),
                    str(tmp_path / 'run'), tokenizer_lib.TokenizerError,
                    'the corpus is too small for a tokenizer')
  assert 'give it more text' in message and 'lower' not in message


@pytest.mark.parametrize('content', [b'\0' * 4096, b'some text\n\0\0\0more text\n'])
def test_a_binary_file_is_named_as_binary(tiny, tmp_path, small_corpus_dir, content):
  corpus = tmp_path / 'corpus'
  shutil.copytree(small_corpus_dir, corpus)
  (corpus / 'zeros.txt').write_bytes(content)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  message = refused(tiny(**{'data.text_glob': str(corpus / '*.txt')}), str(workdir),
                    corpus_lib.CorpusError, f'{corpus / "zeros.txt"}: a binary file, not text')
  assert 'remove it from the glob' in message


@pytest.fixture(scope='module')
def trained(two_step_run):
  return two_step_run


@pytest.mark.parametrize('damage', ['ocdbt_chunks_deleted', 'data_item_deleted'])
def test_a_damaged_checkpoint_is_called_damaged_without_reprs(trained, tmp_path, damage):
  config, whole = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(whole, workdir)
  step_dir = os.path.join(checkpoints.directory(workdir), '2')
  if damage == 'ocdbt_chunks_deleted':  # TensorStore's message then carries its spec's repr
    for f in glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*')):
      os.remove(f)
  else:
    shutil.rmtree(os.path.join(step_dir, 'data'))
  message = refused(config, workdir, checkpoints.CheckpointError,
                    f'checkpoint {step_dir} cannot be read (')
  assert 'it is damaged' in message and 'config' not in message
  for junk in ('<', 'TensorStore(', 'bound method', 'object at 0x', 'See full'):
    assert junk not in message, message
