"""Per-document sums of the estimators' values: intervals that respect documents.

Occurrences of an item within one held-out document are not independent (the same topic,
speaker, phrasing), so per-item intervals treat documents as clusters (cluster-robust,
stats.cluster_mean_ci) and the class statistics' intervals resample documents before
items (`bootstrap_scores`). The scored positions' document ids come from the packed
held-out stream (`window_docs`): every document ends with EOS.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from twotower_jax.analysis import stats
from twotower_jax.data import tokenizer as tokenizer_lib


def window_docs(windows_WxL1: np.ndarray) -> np.ndarray:
  """int[W, L+1]: the document of each token of consecutive packed windows (stride L).

  A document's EOS belongs to it; the PAD tail after the stream belongs to the last one.
  """
  w, l1 = windows_WxL1.shape
  if w == 0:
    return np.zeros((0, l1), np.int64)
  stream = np.concatenate([windows_WxL1[:, :-1].reshape(-1), windows_WxL1[-1, -1:]])
  eos = stream == tokenizer_lib.EOS_ID
  doc = np.cumsum(eos) - eos
  idx = np.arange(w)[:, None] * (l1 - 1) + np.arange(l1)[None, :]
  return doc[idx]


class DocItemSums:
  """Accumulates (document, item) -> count and per-tower value sums over scored positions."""

  def __init__(self, vocab: int):
    self.vocab = vocab
    self._keys, self._values = [], []

  def add(self, docs_P: np.ndarray, items_P: np.ndarray, values_NxP: np.ndarray) -> None:
    """Scored positions only: their document ids, target ids and per-tower values."""
    keys = np.asarray(docs_P, np.int64) * self.vocab + np.asarray(items_P, np.int64)
    uniq, inv = np.unique(keys, return_inverse=True)
    vals = np.asarray(values_NxP, np.float64)
    sums = np.zeros((uniq.size, vals.shape[0] + 1))
    np.add.at(sums, inv, np.concatenate([np.ones((1, keys.size)), vals]).T)
    self._keys.append(uniq)
    self._values.append(sums)

  def result(self) -> dict[str, np.ndarray]:
    """{'doc', 'item', 'count', 'sum_ExN'}: one entry per (document, item) pair seen."""
    if not self._keys:
      return {'doc': np.zeros(0, np.int64), 'item': np.zeros(0, np.int64),
              'count': np.zeros(0), 'sum_ExN': np.zeros((0, 0)), 'vocab': self.vocab}
    keys = np.concatenate(self._keys)
    vals = np.concatenate(self._values)
    uniq, inv = np.unique(keys, return_inverse=True)
    sums = np.zeros((uniq.size, vals.shape[1]))
    np.add.at(sums, inv, vals)
    return {'doc': uniq // self.vocab, 'item': uniq % self.vocab, 'count': sums[:, 0],
            'sum_ExN': sums[:, 1:], 'vocab': self.vocab}


def _matrices(cl: dict[str, np.ndarray], items_I: np.ndarray, weights_IxN: np.ndarray):
  """(count_GxI, pref-weighted sum_GxI) as sparse matrices over the documents G."""
  col = np.full(int(cl['vocab']), -1)
  col[items_I] = np.arange(items_I.size)
  keep = col[cl['item']] >= 0
  docs, cols = cl['doc'][keep], col[cl['item'][keep]]
  g = int(docs.max()) + 1 if docs.size else 1
  pref_sum = np.einsum('en,en->e', cl['sum_ExN'][keep], weights_IxN[cols])
  shape = (g, items_I.size)
  count = sparse.csr_matrix((cl['count'][keep], (docs, cols)), shape=shape)
  psum = sparse.csr_matrix((pref_sum, (docs, cols)), shape=shape)
  return count, psum


def pref_intervals(cl: dict[str, np.ndarray], weights_VxN: np.ndarray,
                   level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Per vocabulary item the cluster-robust interval of its preference (sum_k w_k v_k)."""
  count, psum = _matrices(cl, np.arange(weights_VxN.shape[0]), weights_VxN)
  _, lo, hi = stats.cluster_mean_ci(psum, count, level)
  return lo, hi


def bootstrap_scores(cl: dict[str, np.ndarray], items_I: np.ndarray, weights_IxN: np.ndarray,
                     n_boot: int, seed: int) -> np.ndarray:
  """float[B, I]: the items' preferences recomputed with the documents resampled with
  replacement (B draws); NaN for an item absent from a draw's documents."""
  count, psum = _matrices(cl, np.asarray(items_I), np.asarray(weights_IxN))
  g = count.shape[0]
  rng = np.random.default_rng(seed)
  w_BxG = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot).astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.asarray(psum.T.dot(w_BxG.T).T) / np.asarray(count.T.dot(w_BxG.T).T)


def summary(cl: dict[str, Any]) -> dict[str, Any]:
  """How many documents the scored positions come from."""
  return {'n_documents': int(np.unique(cl['doc']).size)}
