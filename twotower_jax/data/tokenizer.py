"""SentencePiece: trained on the training split on first use, then read from the workdir.

Fixed ids every part of the code relies on: PAD=0 (never a target), UNK=1, BOS=2,
EOS=3 (ends each document), MASK=4 (the masked-LM corruption symbol).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from twotower_jax import errors
from twotower_jax import workdir as workdir_lib

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = '[MASK]'
SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID)


class TokenizerError(errors.UserError):
  """A tokenizer that cannot be trained or does not fit the workdir."""


def _sentences(docs: Iterable[str], max_bytes: int) -> Iterable[str]:
  """Non-empty lines, each cut to what SentencePiece accepts as one sentence."""
  for doc in docs:
    for line in doc.splitlines():
      line = line.strip()
      while line:
        yield line[:max_bytes // 4]  # characters, at most 4 bytes each in UTF-8
        line = line[max_bytes // 4:]


def train(docs: Sequence[str], path: str, vocab_size: int, model_type: str = 'unigram') -> None:
  """Trains on `docs` and writes the model to `path` atomically."""
  max_bytes = 16384
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
    prefix = os.path.join(tmp, 'spm')
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(_sentences(docs, max_bytes)), model_prefix=prefix,
          vocab_size=vocab_size, model_type=model_type, character_coverage=0.9999,
          pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
          user_defined_symbols=[MASK_PIECE], input_sentence_size=2_000_000,
          shuffle_input_sentence=False, max_sentence_length=max_bytes, num_threads=2,
          minloglevel=2)
    except RuntimeError as e:
      msg = str(e).splitlines()[-1] if str(e) else type(e).__name__
      if 'Vocabulary size' in msg or 'vocab_size' in msg:
        raise TokenizerError(f'data.vocab_size={vocab_size} is larger than this corpus supports '
                             f'({msg.strip()}); lower data.vocab_size') from None
      raise TokenizerError(f'SentencePiece training failed: {msg.strip()}') from None
    os.replace(prefix + '.model', path)


def load(path: str) -> spm.SentencePieceProcessor:
  if not os.path.exists(path):
    raise TokenizerError(f'{path} is missing; train first (python -m twotower_jax.main)')
  sp = spm.SentencePieceProcessor()
  try:
    sp.load(path)
  except (OSError, RuntimeError):
    raise TokenizerError(f'{path} is not a SentencePiece model; restore it from the run '
                         'that wrote the checkpoints') from None
  if sp.piece_to_id(MASK_PIECE) != MASK_ID or sp.pad_id() != PAD_ID or sp.eos_id() != EOS_ID:
    raise TokenizerError(f'{path} was not written by twotower_jax (special ids differ)')
  return sp


def train_or_load(docs: Sequence[str], workdir: str, vocab_size: int,
                  model_type: str = 'unigram') -> spm.SentencePieceProcessor:
  """Reuses DIR/tokenizer.model when present, so a resumed run keeps its ids."""
  path = workdir_lib.path(workdir, workdir_lib.TOKENIZER)
  if not os.path.exists(path):
    train(docs, path, vocab_size, model_type)
  sp = load(path)
  if sp.get_piece_size() != vocab_size:
    raise TokenizerError(f'{path} has {sp.get_piece_size()} pieces but data.vocab_size='
                         f'{vocab_size}; use the original vocab size or a new workdir')
  return sp


def file_digest(path: str) -> str:
  """sha256 of the tokenizer file, saved with each checkpoint."""
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def check_digest(digest: str, saved: str | None, workdir: str) -> None:
  """Refuses a tokenizer file other than the one the checkpoint was trained with."""
  if saved is not None and saved != digest:
    raise TokenizerError(f'{workdir_lib.path(workdir, workdir_lib.TOKENIZER)} is not the tokenizer the '
                         'checkpoints were trained with; put the original file back or use a '
                         'new workdir')


def encode_docs(sp: spm.SentencePieceProcessor, docs: Sequence[str]) -> list[np.ndarray]:
  """Token ids per document, each ended by EOS."""
  out = []
  for ids in sp.encode([d for d in docs]):
    out.append(np.asarray(list(ids) + [EOS_ID], dtype=np.int32))
  return out
