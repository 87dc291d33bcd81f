"""Prepared token shards: a corpus tokenised and packed once, read a few windows at a time.

`python -m twotower_jax.prepare --config=... --out=DIR` writes DIR (local or gs://):

  DIR/manifest.json          what the windows are: tokenizer sha256, seq_len, vocabulary,
                             windows/tokens/documents per split, the data config, timings
  DIR/tokenizer.model        the SentencePiece model of the windows (copied into a workdir)
  DIR/train/, DIR/val/       the packed windows (data/windows.py's packing) as a zarr v3
                             array [n_windows, seq_len + 1] through TensorStore: one object
                             per SHARD_WINDOWS windows, each window its own chunk in it, so
                             reading a window is one byte-range read, locally or from GCS
  DIR/train_token_counts.npy unigram counts of the training stream (the eval baseline)

TensorStore rather than ArrayRecord: array_record cannot open gs:// paths (its reader is a
local file descriptor), while TensorStore reads and writes both and is already Orbax's.
Training (`data.prepared=DIR`) opens the arrays and reads only the rows of each batch its
process holds: no corpus in memory and nothing tokenised at start or resume.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import ml_collections
import numpy as np
import tensorstore as ts

from twotower_jax import config as config_lib
from twotower_jax import paths
from twotower_jax.data.corpus import CorpusError

FORMAT = 'twotower_jax.shards/1'
MANIFEST = 'manifest.json'
TOKENIZER = 'tokenizer.model'
COUNTS = 'train_token_counts.npy'
SPLITS = ('train', 'val')
SHARD_WINDOWS = 4096  # windows per stored object
_MAX_WINDOWS = 2**40  # the arrays' declared length; the manifest holds the real count


def window_dtype(vocab_size: int) -> str:
  """uint16 while every id fits (half the bytes of int32), else int32."""
  return 'uint16' if vocab_size <= 2**16 else 'int32'


def _kvstore(path: str) -> str:
  path = paths.absolute(path)
  return path + '/' if paths.is_remote(path) else f'file://{path}/'


def create_array(path: str, seq_len: int, dtype: str) -> ts.TensorStore:
  """An empty (or, when interrupted before, the existing) window array at `path`."""
  spec = {'driver': 'zarr3', 'kvstore': _kvstore(path), 'metadata': {
      'shape': [_MAX_WINDOWS, seq_len + 1], 'data_type': dtype,
      'chunk_grid': {'name': 'regular',
                     'configuration': {'chunk_shape': [SHARD_WINDOWS, seq_len + 1]}},
      'codecs': [{'name': 'sharding_indexed', 'configuration': {
          'chunk_shape': [1, seq_len + 1],
          'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}],
          'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                           {'name': 'crc32c'}],
          'index_location': 'start'}}]}}  # read with a plain byte range, no suffix range
  return ts.open(spec, open=True, create=True).result()


class Windows:
  """One split's windows, read on demand: len(), shape, and [i], [a:b], [ids] or [a:b, c:d]
  give int32 rows [k, seq_len + 1] (what an in-memory split's array gives); np.asarray
  reads them all."""

  def __init__(self, path: str, n_windows: int, seq_len: int):
    self.path = path
    self.shape = (int(n_windows), seq_len + 1)
    self.dtype = np.dtype(np.int32)
    self._array = ts.open({'driver': 'zarr3', 'kvstore': _kvstore(path)}, open=True,
                          read=True).result()

  def __len__(self) -> int:
    return self.shape[0]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray, np.concatenate
    rows = self[:]
    return rows if dtype is None else rows.astype(dtype)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, tuple):  # rows first, then the rest within them: w[:, 1:]
      rows = self[index[0]]
      return rows[(slice(None),) * (rows.ndim - 1) + index[1:]]
    if isinstance(index, (int, np.integer)):
      return self[np.asarray([index])][0]
    ids = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index)
    if ids.size == 0:
      return np.zeros((0, self.shape[1]), np.int32)
    if ids.min() < -len(self) or ids.max() >= len(self):
      raise IndexError(f'window index out of range for {len(self)} windows')
    return self._array[ids % len(self)].read().result().astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """An opened prepared folder."""
  path: str
  manifest: dict[str, Any]

  @property
  def tokenizer_path(self) -> str:
    return paths.join(self.path, TOKENIZER)

  def windows(self, split: str) -> Windows:
    return Windows(paths.join(self.path, split), self.manifest['splits'][split]['windows'],
                   self.manifest['seq_len'])

  def train_token_counts(self) -> np.ndarray:
    return np.load(io.BytesIO(paths.read_bytes(paths.join(self.path, COUNTS))))


def read_manifest(path: str) -> dict[str, Any] | None:
  """DIR/manifest.json, or None when there is none."""
  import json  # pylint: disable=g-import-not-at-top
  file = paths.join(path, MANIFEST)
  if not paths.exists(file):
    return None
  try:
    return json.loads(paths.read_bytes(file))
  except ValueError as e:
    raise CorpusError(f'{file} is damaged ({e}); prepare the data again into a new '
                      '--out') from None


def open_prepared(data_config: ml_collections.ConfigDict) -> Prepared:
  """data.prepared opened and checked against this run's data settings (one-line errors)."""
  where = data_config.prepared
  manifest = read_manifest(where)
  if manifest is None or manifest.get('format') != FORMAT:
    raise CorpusError(f'data.prepared={where!r} holds no prepared data (no {MANIFEST} of '
                      f'{FORMAT}); write it with python -m twotower_jax.prepare --out={where}')
  if not manifest.get('complete'):
    raise CorpusError(f'data.prepared={where!r} is an unfinished preparation; rerun python -m '
                      'twotower_jax.prepare with the same --out to finish it')
  for field in ('seq_len', 'vocab_size', 'tokenizer_type'):
    if manifest[field] != data_config[field]:
      raise config_lib.ConfigError(
          f'data.prepared={where!r} was prepared with data.{field}={manifest[field]!r} but this '
          f'run has {data_config[field]!r}; set --config.data.{field}={manifest[field]!r} or '
          'prepare the data again with this config')
  return Prepared(paths.absolute(where), manifest)
