"""SentencePiece: trained on the training split on first use, then read from the workdir.

Fixed ids every part of the code relies on: PAD=0 (never a target), UNK=1, BOS=2,
EOS=3 (ends each document), MASK=4 (the masked-LM corruption symbol).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from twotower_jax import errors
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib

log = logging.getLogger('twotower_jax')

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
  """Trains on `docs` and writes the model to `path` (local or gs://) atomically."""
  max_bytes = 16384
  local_dir = None if paths.is_remote(path) else os.path.dirname(os.path.abspath(path))
  with tempfile.TemporaryDirectory(dir=local_dir) as tmp:
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
      raise TokenizerError(_training_error(msg.strip(), vocab_size)) from None
    if paths.is_remote(path):
      with open(prefix + '.model', 'rb') as f:
        paths.write_atomic(path, f.read())
    else:
      os.replace(prefix + '.model', path)


# SentencePiece's two vocabulary-size failures: fewer pieces than the corpus's characters
# ("... smaller than required_chars. 16 vs 78 ..."), or more than the corpus can fill
# ("Vocabulary size too high (256). Please set it to a value <= 6.").
_TOO_SMALL_RE = re.compile(r'smaller than required_chars\D*(\d+) vs (\d+)')
_TOO_HIGH_RE = re.compile(r'too high.*<= ?(\d+)')
_MIN_VOCAB = 16  # config.validate's lower bound


def _training_error(msg: str, vocab_size: int) -> str:
  """The one-line error for a failed SentencePiece training, with the fix pointing the right
  way (a too-small vocabulary must be raised, a too-large one lowered)."""
  detail = re.sub(r'^.*?\] ', '', msg)  # drop SentencePiece's source location and check
  small, high = _TOO_SMALL_RE.search(msg), _TOO_HIGH_RE.search(msg)
  if small:
    need = int(small.group(2))
    return (f'data.vocab_size={vocab_size} is too small for this corpus: SentencePiece needs at '
            f'least {need} pieces for its characters and special symbols; raise '
            f'data.vocab_size to {need} or more')
  if high:
    most = int(high.group(1))
    if most < _MIN_VOCAB:
      return (f'the corpus is too small for a tokenizer: SentencePiece can fill at most {most} '
              f'pieces ({detail}); give it more text')
    return (f'data.vocab_size={vocab_size} is larger than this corpus supports (at most '
            f'{most} pieces); lower data.vocab_size to {most} or less, or give it more text')
  return f'SentencePiece training failed: {detail}'



def load(path: str) -> spm.SentencePieceProcessor:
  if not paths.exists(path):
    raise TokenizerError(f'{path} is missing; train first (python -m twotower_jax.main)')
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromSerializedProto(paths.read_bytes(path))
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
  if not paths.exists(path):
    log.info('training the tokenizer: %d %s pieces on %d documents', vocab_size, model_type,
             len(docs))
    train(docs, path, vocab_size, model_type)
  sp = load(path)
  if sp.get_piece_size() != vocab_size:
    raise TokenizerError(f'{path} has {sp.get_piece_size()} pieces but data.vocab_size='
                         f'{vocab_size}; use the original vocab size or a new workdir')
  return sp


def file_digest(path: str) -> str:
  """sha256 of the tokenizer file, saved with each checkpoint."""
  return hashlib.sha256(paths.read_bytes(path)).hexdigest()


def check_digest(digest: str, saved: str | None, workdir: str) -> None:
  """Refuses a tokenizer file other than the one the checkpoint was trained with."""
  if saved is not None and saved != digest:
    raise TokenizerError(f'{workdir_lib.path(workdir, workdir_lib.TOKENIZER)} is not the tokenizer the '
                         'checkpoints were trained with; put the original file back or use a '
                         'new workdir')


def piece_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
  """float32[V]: the UTF-8 bytes of text each piece stands for, the denominator of bits per
  byte: '▁' is one space, a byte-fallback piece one byte, EOS one (the break between
  documents), UNK one (a character the vocabulary lacks), PAD, BOS and MASK none."""
  out = np.zeros(sp.get_piece_size(), np.float32)
  for i in range(sp.get_piece_size()):
    if i in (EOS_ID, UNK_ID) or sp.is_byte(i):
      out[i] = 1.0
    elif not (sp.is_control(i) or i == MASK_ID):
      out[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
  return out


def encode_docs(sp: spm.SentencePieceProcessor, docs: Sequence[str]) -> list[np.ndarray]:
  """Token ids per document, each ended by EOS."""
  out = []
  for ids in sp.encode([d for d in docs]):
    out.append(np.asarray(list(ids) + [EOS_ID], dtype=np.int32))
  return out
