"""Packing and the grain pipeline: every token a target once, resumable, per-process rows."""

import numpy as np
import pytest

from twotower_jax.data import windows as data_lib
from twotower_jax.data import tokenizer as tokenizer_lib


def test_pack_windows_targets_cover_the_stream_once():
  docs = [np.arange(5, 15, dtype=np.int32), np.arange(20, 28, dtype=np.int32)]  # 18 tokens
  windows = data_lib.pack_windows(docs, seq_len=4)
  stream = np.concatenate(docs)
  assert windows.shape == (5, 5)
  targets = windows[:, 1:].ravel()
  n = stream.size - 1
  np.testing.assert_array_equal(targets[:n], stream[1:])
  assert n == 17 and (targets[n:] == tokenizer_lib.PAD_ID).all()  # 3 PAD targets
  np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])  # one-token overlap


def test_train_dataset_is_deterministic_and_resumable():
  windows = np.arange(50 * 3, dtype=np.int32).reshape(50, 3)
  it = iter(data_lib.train_dataset(windows, batch_size=4, seed=7))
  first = [next(it) for _ in range(5)]
  state = it.get_state()
  rest = [next(it) for _ in range(20)]  # crosses an epoch boundary (50 rows / 4)
  it2 = iter(data_lib.train_dataset(windows, batch_size=4, seed=7))
  it2.set_state(state)
  for a, b in zip(rest, [next(it2) for _ in range(20)]):
    np.testing.assert_array_equal(a, b)
  again = iter(data_lib.train_dataset(windows, batch_size=4, seed=7))
  np.testing.assert_array_equal(first[0], next(again))
  other = iter(data_lib.train_dataset(windows, batch_size=4, seed=8))
  assert not np.array_equal(first[0], next(other))
  seen = np.concatenate(first + rest)[:48, 0]  # first epoch: no row twice
  assert len(set(seen[:48].tolist())) == 48


def test_process_slices_assemble_the_global_batch():
  windows = np.arange(40 * 2, dtype=np.int32).reshape(40, 2)
  whole = iter(data_lib.train_dataset(windows, 8, seed=1))
  parts = [iter(data_lib.train_dataset(windows, 8, seed=1, process_index=p, process_count=2))
           for p in range(2)]
  for _ in range(6):
    np.testing.assert_array_equal(next(whole), np.concatenate([next(p) for p in parts]))
  with pytest.raises(ValueError, match='not divisible'):
    data_lib.train_dataset(windows, 7, seed=1, process_count=2)


def test_eval_batches_pad_to_whole_batches():
  windows = np.ones((10, 3), np.int32)
  batches = data_lib.eval_batches(windows, batch_size=4, n_windows=20)
  assert [b.shape for b in batches] == [(4, 3)] * 3
  assert (batches[-1][2:] == tokenizer_lib.PAD_ID).all()


def test_eval_windows_do_not_depend_on_the_batch_size():
  windows = np.arange(1, 40 * 3 + 1, dtype=np.int32).reshape(40, 3)
  for b in (4, 8, 16, 6):
    rows = np.concatenate(data_lib.eval_batches(windows, batch_size=b, n_windows=16))
    np.testing.assert_array_equal(rows[:16], windows[:16])
    assert (rows[16:] == tokenizer_lib.PAD_ID).all()


def test_unigram_cross_entropy_matches_formula():
  counts = np.array([0, 0, 0, 3, 1, 0], np.int64)  # PAD never counted
  batch = np.array([[3, 4, 3, 0]], np.int32)  # targets 4, 3 and a PAD
  probs = (counts + 1) / (counts.sum() + counts.size)
  expected = -(np.log(probs[4]) + np.log(probs[3])) / 2
  assert data_lib.unigram_cross_entropy(counts, [batch]) == pytest.approx(expected)
