"""Preparing a corpus once: tokenizer on a sample, then every document tokenised by worker
processes and packed into shards (data/shards.py), resumable after an interruption.

Documents are streamed (corpus.documents): the main process reads a batch of them at a time,
the workers encode them in order, and the packer cuts the token stream into the windows
`windows.pack_windows` makes from the whole stream at once (the same rows). After every
shard it records where it is (DIR/progress.json + progress.npz: the next document, the
tokens and windows carried over, the counts so far), so a rerun continues from there.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing
import time
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import paths
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import shards
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.data.corpus import CorpusError

log = logging.getLogger('twotower_jax')

PROGRESS = 'progress.json'
PROGRESS_ARRAYS = 'progress.npz'
_BATCH_BYTES = 1 << 22  # text per worker task


def _sample(docs: corpus_lib.Documents, max_bytes: int) -> Iterator[str]:
  """The first training documents, up to `max_bytes` of text (the tokenizer's sample)."""
  total = 0
  for name in docs.train_names:
    if total >= max_bytes:
      return
    text = docs.read(name)
    total += len(text.encode('utf-8'))
    yield text


_worker_sp = None


def _init_worker(model: bytes) -> None:
  global _worker_sp
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  _worker_sp = spm.SentencePieceProcessor()
  _worker_sp.LoadFromSerializedProto(model)


def _encode(texts: list[str]) -> list[np.ndarray]:
  return tokenizer_lib.encode_docs(_worker_sp, texts)


def _batches(docs: corpus_lib.Documents, names: Sequence[str], start: int
             ) -> Iterator[tuple[int, list[str]]]:
  """(index after the batch, texts) for the documents from `start` on, ~_BATCH_BYTES each."""
  texts, size = [], 0
  for i in range(start, len(names)):
    texts.append(docs.read(names[i]))
    size += len(texts[-1])
    if size >= _BATCH_BYTES:
      yield i + 1, texts
      texts, size = [], 0
  if texts:
    yield len(names), texts


def _encoded(pool, docs, names, start, workers) -> Iterator[tuple[int, list[np.ndarray]]]:
  """The batches encoded by the pool, in order, at most 2 x workers in flight."""
  pending = collections.deque()
  for end, texts in _batches(docs, names, start):
    pending.append((end, len(texts), sum(map(len, texts)), pool.apply_async(_encode, (texts,))))
    if len(pending) >= 2 * workers:
      end, _, n_chars, job = pending.popleft()
      yield end, n_chars, job.get()
  while pending:
    end, _, n_chars, job = pending.popleft()
    yield end, n_chars, job.get()


class _Packer:
  """The token stream cut into windows of seq_len + 1 at stride seq_len (pack_windows)."""

  def __init__(self, seq_len: int, carry: np.ndarray, pending: np.ndarray):
    self.seq_len, self.carry = seq_len, carry
    self.pending = [pending] if len(pending) else []
    self.n_pending = len(pending)

  def add(self, ids: np.ndarray) -> None:
    stream = np.concatenate([self.carry, ids])
    n = max(0, (len(stream) - 1) // self.seq_len)
    if n:
      idx = np.arange(n)[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
      self.pending.append(stream[idx])
      self.n_pending += n
    self.carry = stream[n * self.seq_len:]

  def finish(self) -> None:
    """The last, PAD-padded window (when the tail holds a target)."""
    if len(self.carry) >= 2:
      last = np.full(self.seq_len + 1, tokenizer_lib.PAD_ID, np.int32)
      last[:len(self.carry)] = self.carry
      self.pending.append(last[None])
      self.n_pending += 1
    self.carry = self.carry[-1:]

  def rows(self) -> np.ndarray:
    """The packed windows not yet written (kept)."""
    rows = np.concatenate(self.pending) if self.pending else np.zeros((0, self.seq_len + 1),
                                                                       np.int32)
    self.pending = [rows] if len(rows) else []
    return rows

  def take(self, n: int) -> np.ndarray:
    """The first `n` windows not yet written (removed)."""
    rows = self.rows()
    self.pending, self.n_pending = ([rows[n:]] if len(rows) > n else []), max(len(rows) - n, 0)
    return rows[:n]


def _load_progress(out: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  file = paths.join(out, PROGRESS)
  if not paths.exists(file):
    return {}, {}
  arrays = np.load(io.BytesIO(paths.read_bytes(paths.join(out, PROGRESS_ARRAYS))))
  return json.loads(paths.read_bytes(file)), {k: arrays[k] for k in arrays.files}


def _save_progress(out: str, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.write_atomic(paths.join(out, PROGRESS_ARRAYS), buf.getvalue())  # before the json
  paths.write_atomic(paths.join(out, PROGRESS), json.dumps(state, indent=1) + '\n')


def _write_split(out: str, split: str, names: Sequence[str], docs, pool, workers: int,
                 dtype: str, seq_len: int, vocab: int, state: dict[str, Any],
                 arrays: dict[str, np.ndarray], report: Callable[[str], None]) -> dict[str, Any]:
  """Encodes and packs one split, resuming from `state`; returns its manifest entry."""
  st = state.setdefault(split, {'next_doc': 0, 'windows': 0, 'tokens': 0, 'chars': 0})
  packer = _Packer(seq_len, arrays.get(f'{split}_carry', np.zeros(0, np.int32)),
                   arrays.get(f'{split}_pending', np.zeros((0, seq_len + 1), np.int32)))
  counts = arrays.get('counts', np.zeros(vocab, np.int64))
  array = shards.create_array(paths.join(out, split), seq_len, dtype)
  size = shards.SHARD_WINDOWS

  def write(rows: np.ndarray, end: int) -> None:
    """Stores `rows` after the windows written so far, then records where the split is."""
    at = st['windows']
    if len(rows):
      array[at:at + len(rows)].write(rows.astype(dtype)).result()
    st['windows'] += len(rows)
    st['next_doc'] = end
    arrays.update({f'{split}_carry': packer.carry, f'{split}_pending': packer.rows(),
                   'counts': counts})
    _save_progress(out, state, arrays)
    report(f'{split}: {st["windows"]:,} windows, {st["next_doc"]:,}/{len(names):,} documents')

  for end, n_chars, encoded in _encoded(pool, docs, names, st['next_doc'], workers):
    for ids in encoded:
      packer.add(ids)
      st['tokens'] += len(ids)
      if split == 'train':
        counts += np.bincount(ids, minlength=vocab)
    st['chars'] += n_chars
    while packer.n_pending >= size:
      write(packer.take(size), end)
  if not st.get('done'):
    packer.finish()
    rows = packer.take(packer.n_pending)
    if st['windows'] + len(rows) == 0:
      raise CorpusError(f'the {split} documents hold fewer than two tokens; give them more text')
    st['done'] = True
    write(rows, len(names))
  if split == 'train':
    buf = io.BytesIO()
    np.save(buf, counts)
    paths.write_atomic(paths.join(out, shards.COUNTS), buf.getvalue())
  return {'windows': st['windows'], 'tokens': st['tokens'], 'documents': len(names),
          'characters': st['chars']}


def prepare(config: ml_collections.ConfigDict, out: str, workers: int = 2,
            sample_mb: float = 100.0, report: Callable[[str], None] = log.info
            ) -> dict[str, Any]:
  """Writes the prepared folder `out` for config.data; returns its manifest."""
  d = config.data
  t0 = time.perf_counter()
  docs = corpus_lib.documents(d)
  if not docs.train_names or not docs.val_names:
    which = 'training' if not docs.train_names else 'held-out'
    raise CorpusError(f'data.source={d.source!r} gave no {which} documents; point it at more '
                      'text or raise data.val_fraction')
  out = paths.absolute(out)
  settings = {'seq_len': d.seq_len, 'vocab_size': d.vocab_size, 'tokenizer_type': d.tokenizer_type,
              'data': config_lib.to_dict(config)['data']}
  done = shards.read_manifest(out)
  if done is not None:
    if done.get('source') != settings['data']:
      raise config_lib.ConfigError(f'--out={out} holds data prepared with other data settings; '
                                   'use a new --out')
    report(f'{out} is prepared already')
    return done
  if paths.isdir(out) and paths.listdir(out) and not paths.exists(paths.join(out, PROGRESS)):
    raise CorpusError(f'--out={out} holds other files (not a preparation of this command); '
                      'give a new or empty folder')
  paths.makedirs(out)
  state, arrays = _load_progress(out)
  tok = paths.join(out, shards.TOKENIZER)
  if state and state.get('settings') != settings:
    raise config_lib.ConfigError(f'--out={out} holds a preparation with other data settings; '
                                 'use a new --out, or the config it was started with')
  if not state:  # from the first moment on, a rerun knows the folder as its own
    state = {'settings': settings}
    _save_progress(out, state, arrays)
  if not paths.exists(tok):
    report(f'training the tokenizer on the first {sample_mb:g} MB of training text')
    tokenizer_lib.train(_sample(docs, int(sample_mb * 2**20)), tok, d.vocab_size,
                        d.tokenizer_type)
  sp = tokenizer_lib.load(tok)
  t_tokenizer = time.perf_counter() - t0
  state.setdefault('tokenizer_sha256', tokenizer_lib.file_digest(tok))
  dtype = shards.window_dtype(d.vocab_size)
  splits = {}
  ctx = multiprocessing.get_context('spawn')  # no fork of a process that may hold threads
  with ctx.Pool(workers, _init_worker, (sp.serialized_model_proto(),)) as pool:
    for split, names in (('train', docs.train_names), ('val', docs.val_names)):
      splits[split] = _write_split(out, split, names, docs, pool, workers, dtype, d.seq_len,
                                   d.vocab_size, state, arrays, report)
  seconds = time.perf_counter() - t0
  text_mb = sum(s['characters'] for s in splits.values()) / 2**20
  encode_s = seconds - t_tokenizer
  manifest = {
      'format': shards.FORMAT, 'complete': True, 'tokenizer_sha256': state['tokenizer_sha256'],
      'seq_len': d.seq_len, 'vocab_size': d.vocab_size, 'tokenizer_type': d.tokenizer_type,
      'window_dtype': dtype, 'shard_windows': shards.SHARD_WINDOWS, 'splits': splits,
      'source': settings['data'], 'tokenizer_sample_mb': sample_mb, 'workers': workers,
      'seconds_this_run': round(seconds, 1), 'tokenizer_seconds_this_run': round(t_tokenizer, 1),
      'text_mb_per_s_this_run': round(text_mb / seconds, 2) if seconds else None,
      'encode_mb_per_s_this_run': round(text_mb / encode_s, 2) if encode_s else None}
  paths.write_atomic(paths.join(out, shards.MANIFEST), json.dumps(manifest, indent=1) + '\n')
  for name in (PROGRESS, PROGRESS_ARRAYS):  # the manifest now says it is complete
    paths.remove(paths.join(out, name))
  return manifest
