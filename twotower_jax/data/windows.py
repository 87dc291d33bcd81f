"""Packed windows and the grain pipelines that feed them to the train step.

Documents (each ended by EOS) are concatenated into one stream and cut into windows
of seq_len + 1 tokens with stride seq_len, so every token is a target exactly once;
the tail is padded with PAD, which the loss ignores.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from twotower_jax.data import tokenizer as tokenizer_lib


def pack_windows(docs_ids: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
  """int32[n_windows, seq_len + 1]; consecutive windows overlap by one token."""
  stream = np.concatenate(list(docs_ids)) if docs_ids else np.zeros((0,), np.int32)
  if stream.size < 2:
    raise ValueError('the corpus has fewer than two tokens; give it more text')
  n_windows = -(-(stream.size - 1) // seq_len)
  padded = np.full(n_windows * seq_len + 1, tokenizer_lib.PAD_ID, dtype=np.int32)
  padded[:stream.size] = stream
  idx = np.arange(n_windows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return padded[idx]


@dataclasses.dataclass(frozen=True)
class Splits:
  train_windows: np.ndarray  # int32[n_train, seq_len + 1]
  val_windows: np.ndarray  # int32[n_val, seq_len + 1]
  train_token_counts: np.ndarray  # int64[vocab]: unigram counts of the training stream


def make_splits(sp, train_docs: Sequence[str], val_docs: Sequence[str], seq_len: int) -> Splits:
  train_ids = tokenizer_lib.encode_docs(sp, train_docs)
  val_ids = tokenizer_lib.encode_docs(sp, val_docs)
  counts = np.bincount(np.concatenate(train_ids), minlength=sp.get_piece_size())
  return Splits(pack_windows(train_ids, seq_len), pack_windows(val_ids, seq_len), counts)


def train_dataset(windows: np.ndarray, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1,
                  rows: tuple[int, int] | None = None) -> grain.IterDataset:
  """Endless, reshuffled each epoch, this process's rows of every global batch.

  Global batch b is rows [b*B, (b+1)*B) of the shuffled, repeated stream; process p
  takes `rows` (the block its devices hold, sharding.process_rows) or by default its
  contiguous block of B/process_count rows, so the global batch is the same
  whatever the number of processes. Windows that are not an array in memory (prepared
  shards, data/shards.py) are read a batch at a time, only this process's rows: the same
  shuffle over window indices picks the same rows.
  """
  if batch_size % process_count:
    raise ValueError(f'train.batch_size={batch_size} is not divisible by the '
                     f'{process_count} processes')
  local = batch_size // process_count
  if rows is None:
    rows = (process_index * local, (process_index + 1) * local)
  if not isinstance(windows, np.ndarray):
    start, stop = rows
    ids = grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat()
    ids = ids.batch(batch_size, drop_remainder=True)
    # A few batches read ahead, not grain's default 500 in 16 threads (thousands of reads
    # at the start, competing with the compile); one batch is one call of parallel reads.
    return ids.map(lambda b: windows[b[start:stop]]).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  if tuple(rows) != (0, batch_size):
    start, stop = rows
    ds = ds.map(lambda b: b[start:stop])
  return ds.to_iter_dataset()


def eval_batches(windows: np.ndarray, batch_size: int, n_windows: int) -> list[np.ndarray]:
  """The first n_windows held-out windows, unshuffled, the same at every eval, cut into
  batches of batch_size.

  The windows do not depend on batch_size (a run resumed with another batch size
  scores the same ones); the last batch is padded with all-PAD rows (weight zero).
  """
  n = min(len(windows), n_windows)
  rows = windows[:n]
  short = (-n) % batch_size
  if short:
    rows = np.concatenate([rows, np.zeros((short, windows.shape[1]), windows.dtype)])
  return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def unigram_cross_entropy(counts: np.ndarray, batches: Sequence[np.ndarray]) -> float:
  """Mean nats per next-token target of an add-one unigram model from training counts."""
  probs = (counts + 1.0) / (counts.sum() + counts.size)
  log_probs = np.log(probs)
  targets = np.concatenate([b[:, 1:].ravel() for b in batches])
  targets = targets[targets != tokenizer_lib.PAD_ID]
  return float(-log_probs[targets].mean())
