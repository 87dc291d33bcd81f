"""SentencePiece: trained once, saved in the workdir, reused, with fixed special ids."""

import os

import pytest

from twotower_jax import workdir as workdir_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def docs(small_corpus_dir):
  import glob
  return [corpus_lib.read_text_file(p) for p in sorted(glob.glob(small_corpus_dir + '/*.txt'))]


def test_train_save_load_round_trip(tmp_path, docs):
  sp = tokenizer_lib.train_or_load(docs, str(tmp_path), vocab_size=300)
  assert sp.get_piece_size() == 300
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
  assert sp.piece_to_id('[MASK]') == tokenizer_lib.MASK_ID
  text = 'The Congress shall have power to lay and collect taxes.'
  assert sp.decode(sp.encode(text)) == text
  path = os.path.join(tmp_path, workdir_lib.TOKENIZER)
  mtime = os.stat(path).st_mtime_ns
  again = tokenizer_lib.train_or_load(['completely different text'], str(tmp_path), 300)
  assert os.stat(path).st_mtime_ns == mtime  # reused, not retrained
  assert again.encode(text) == sp.encode(text)


def test_encode_docs_ends_each_document_with_eos(tmp_path, docs):
  sp = tokenizer_lib.train_or_load(docs, str(tmp_path), vocab_size=300)
  ids = tokenizer_lib.encode_docs(sp, ['one two', 'three'])
  assert [int(x[-1]) for x in ids] == [tokenizer_lib.EOS_ID] * 2
  assert all(tokenizer_lib.PAD_ID not in x for x in ids)


def test_vocab_larger_than_corpus_supports(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match='lower data.vocab_size'):
    tokenizer_lib.train(['a tiny corpus with few words'] * 3, str(tmp_path / 't.model'), 5000)
  assert not os.path.exists(tmp_path / 't.model')


def test_vocab_size_mismatch_with_saved_tokenizer(tmp_path, docs):
  tokenizer_lib.train_or_load(docs, str(tmp_path), vocab_size=300)
  with pytest.raises(tokenizer_lib.TokenizerError, match='has 300 pieces'):
    tokenizer_lib.train_or_load(docs, str(tmp_path), vocab_size=400)


def test_not_a_tokenizer(tmp_path):
  (tmp_path / workdir_lib.TOKENIZER).write_bytes(b'garbage')
  with pytest.raises(tokenizer_lib.TokenizerError, match='not a SentencePiece model'):
    tokenizer_lib.load(str(tmp_path / workdir_lib.TOKENIZER))
