"""Hewitt & Manning structural (distance) probe of each tower's states, per layer.

Tests the "syntax tower" reading directly: if a tower's states at some layer
encode dependency trees, a linear map B exists such that ||B(h_i - h_j)||^2 is
the number of tree edges between words i and j. For every tower and layer we
train such a B (rank r) on CoNLL-U trees and report, on held-out sentences,
UUAS (minimum spanning tree of the predicted distances vs the gold undirected
edges, punctuation excluded) and the distance Spearman (DSpr).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from scipy import sparse
from scipy.sparse import csgraph

from twotower_jax import errors
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import stats
from twotower_jax.analysis import wordclass
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import towers

log = logging.getLogger('twotower_jax')

PUNCT_UPOS = 'PUNCT'


class ProbeError(errors.UserError):
  """The structural probe cannot run with this config or treebank."""


# ---------------------------------------------------------------- trees and metrics


def tree_distances(heads: Sequence[int]) -> np.ndarray:
  """d_WxW[i, j]: number of edges between words i and j (heads 1-based, 0 = root)."""
  heads = np.asarray(heads)
  n = heads.size
  child = np.nonzero(heads > 0)[0]
  adj = sparse.coo_matrix((np.ones(child.size), (child, heads[child] - 1)), shape=(n, n))
  d = csgraph.shortest_path(adj, method='D', directed=False, unweighted=True)
  if not np.all(np.isfinite(d)):
    raise ProbeError('a treebank sentence is not one connected tree; check its HEAD column')
  return d.astype(np.int32)


def mst_edges(dist_WxW: np.ndarray) -> set[tuple[int, int]]:
  """Edges (i < j) of a minimum spanning tree of the complete graph on a symmetric matrix.

  scipy's minimum_spanning_tree drops zero-weight edges (and rounds dense entries below
  1e-8 to zero), so it gets each edge's rank 1..E instead of its weight: Kruskal's tree
  depends only on the order of the weights, and ranks that break ties by position make
  it one tree on every scipy version. NaN weights rank last.
  """
  d = np.asarray(dist_WxW, np.float64)
  n = d.shape[0]
  if n < 2:
    return set()
  rows, cols = np.triu_indices(n, k=1)
  order = np.argsort(np.nan_to_num(d[rows, cols], nan=np.inf), kind='stable')
  rank_E = np.empty(order.size, np.float64)
  rank_E[order] = np.arange(1, order.size + 1)
  tree = csgraph.minimum_spanning_tree(sparse.csr_matrix((rank_E, (rows, cols)), shape=(n, n)))
  tree = tree.tocoo()
  return {(int(min(i, j)), int(max(i, j))) for i, j in zip(tree.row, tree.col)}


def gold_edges(heads: Sequence[int], keep: np.ndarray) -> set[tuple[int, int]]:
  """Undirected dependency edges (i < j, 0-based) whose both ends are kept words."""
  out = set()
  for i, h in enumerate(np.asarray(heads)):
    if h > 0 and keep[i] and keep[h - 1]:
      out.add((min(i, h - 1), max(i, h - 1)))
  return out


def uuas_counts(pred_WxW: np.ndarray, heads: np.ndarray, upos: np.ndarray) -> tuple[int, int]:
  """(correct, gold) undirected edges: MST over the non-punctuation words only (H&M)."""
  keep = np.asarray(upos) != PUNCT_UPOS
  words = np.nonzero(keep)[0]
  gold = gold_edges(heads, keep)
  if words.size < 2:
    return 0, len(gold)
  sub = pred_WxW[np.ix_(words, words)]
  pred = {(min(words[i], words[j]), max(words[i], words[j])) for i, j in mst_edges(sub)}
  return len(pred & gold), len(gold)


def adjacent_uuas_counts(heads: np.ndarray, upos: np.ndarray) -> tuple[int, int]:
  """Baseline: link each non-punctuation word to the next one (right-branching chain)."""
  keep = np.asarray(upos) != PUNCT_UPOS
  words = np.nonzero(keep)[0]
  pred = {(int(a), int(b)) for a, b in zip(words[:-1], words[1:])}
  gold = gold_edges(heads, keep)
  return len(pred & gold), len(gold)


def sentence_spearman(pred_WxW: np.ndarray, gold_WxW: np.ndarray, upos: np.ndarray) -> float:
  """Mean over non-punctuation words of Spearman(predicted, gold distances to the others)."""
  words = np.nonzero(np.asarray(upos) != PUNCT_UPOS)[0]
  n = words.size
  if n < 3:
    return float('nan')
  others_WxO = np.array([np.delete(words, i) for i in range(n)])  # row i: every word but i
  rows = np.arange(n)[:, None]
  pred_WxO, gold_WxO = pred_WxW[words[rows], others_WxO], gold_WxW[words[rows], others_WxO]
  values = stats.row_spearman(pred_WxO, gold_WxO)
  return float(np.nanmean(values)) if np.any(np.isfinite(values)) else float('nan')


def dspr(per_sentence: Sequence[float], lengths: Sequence[int], lo: int = 5, hi: int = 50) -> float:
  """H&M's DSpr: sentence Spearmans averaged within each length in [lo, hi], then over lengths."""
  by_len: dict[int, list[float]] = {}
  for v, n in zip(per_sentence, lengths):
    if lo <= n <= hi and np.isfinite(v):
      by_len.setdefault(int(n), []).append(v)
  if not by_len:
    return float('nan')
  return float(np.mean([np.mean(v) for v in by_len.values()]))


# ---------------------------------------------------------------- states of the towers


def layer_states(model, params, tokens_BxL: jax.Array) -> dict[str, jax.Array]:
  """{layer name: h_NxBxLxH}: every tower's states at each layer (order: `layer_order`).

  Layers: 'input' (what the tower read), 'block_1'..'block_L' (after each block), as
  the tower type's registered `layer_states` names them (bilstm: ELMo's [fwd_i;
  bwd_i], width 2H), and 'final' (the final states the gate sees).
  """
  out, state = model.apply({'params': params}, tokens_BxL, deterministic=True,
                           mutable=['intermediates'])
  inter = state.get('intermediates', {}).get('towers', {})
  layers = dict(towers.get(model.cfg.tower_type).layer_states(inter))
  layers['final'] = out['tower_states_NxBxLxH']
  return layers


def layer_order(names) -> list[str]:
  """input, block_1, ..., block_L, final (jit returns dict keys sorted as strings)."""
  rank = lambda n: (0, 0) if n == 'input' else (2, 0) if n == 'final' else (1, int(n[6:]))
  return sorted(names, key=rank)


def _word_matrix(owner: np.ndarray, n_words: int, mode: str) -> np.ndarray | None:
  """M_WxP with word = M @ piece_states: mean of a word's pieces, or its first piece."""
  m = np.zeros((n_words, owner.size), np.float32)
  for w in range(n_words):
    pieces = np.nonzero(owner == w)[0]
    if pieces.size == 0:
      return None
    if mode == 'first':
      m[w, pieces[0]] = 1.0
    else:
      m[w, pieces] = 1.0 / pieces.size
  return m


def prepare_sentences(sp, sentences: Sequence[wordclass.Sentence], seq_len: int, mode: str
                      ) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
  """Tokenizes sentences as model input: EOS (a document start) + pieces, padded to seq_len.

  Returns the indices of usable sentences (fit the window, every word has a
  piece, at least 2 non-punctuation words), tokens_SxL and each one's
  word-from-piece matrix over positions 1..n_pieces.
  """
  kept, rows, mats = [], [], []
  for i, s in enumerate(sentences):
    if len(s.forms) < 2 or np.sum(s.upos != PUNCT_UPOS) < 2:
      continue
    ids, owner = wordclass.tokenize_sentence(sp, s)
    if ids.size + 1 > seq_len:
      continue
    m = _word_matrix(owner, len(s.forms), mode)
    if m is None:
      continue
    row = np.full(seq_len, tokenizer_lib.PAD_ID, np.int32)
    row[0] = tokenizer_lib.EOS_ID
    row[1:ids.size + 1] = ids
    kept.append(i)
    rows.append(row)
    mats.append(m)
  return kept, np.stack(rows) if rows else np.zeros((0, seq_len), np.int32), mats


def word_states(model, params, tokens_SxL: np.ndarray, mats: list[np.ndarray],
                batch_size: int, crop: bool = False) -> tuple[np.ndarray, list[str]]:
  """x_PxTxH: word representations of all sentences, flat over words, P = towers x layers.

  crop: batch sentences by length and run each batch only as wide as its longest
  (rounded up to a multiple of 32, so few shapes compile). Exact only for left-to-right
  towers, whose states do not see the padding after them. Sentences keep their order
  in the flat word axis either way.
  """
  fn = jax.jit(functools.partial(layer_states, model))
  n_sent, seq_len = tokens_SxL.shape
  order = np.argsort([m.shape[1] for m in mats], kind='stable') if crop else np.arange(n_sent)
  chunks, names = [None] * n_sent, None
  for start in range(0, n_sent, batch_size):
    rows = order[start:start + batch_size]
    batch = tokens_SxL[rows]
    if crop:
      longest = 1 + max(mats[i].shape[1] for i in rows)
      batch = batch[:, :min(seq_len, -(-longest // 32) * 32)]
    if len(rows) < batch_size:  # one compiled shape per width
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(rows), 0)])
    layers = jax.device_get(fn(params, jnp.asarray(batch)))
    names = layer_order(layers)
    # Layers of different widths (bilstm: 2H) are zero-padded to the widest; a linear
    # probe gives zero columns no weight, and they add nothing to the state scale.
    width = max(v.shape[-1] for v in layers.values())
    h = np.stack([np.pad(np.asarray(layers[k], np.float32),
                         [(0, 0)] * 3 + [(0, width - layers[k].shape[-1])]) for k in names],
                 axis=1)  # NxSxBxLxH
    for b, i in enumerate(rows):
      m = mats[i]
      chunks[i] = np.einsum('wp,nsph->nswh', m, h[:, :, b, 1:m.shape[1] + 1])
  x = np.concatenate(chunks, axis=2)  # N x S x T x H
  n, s, t, hdim = x.shape
  return x.reshape(n * s, t, hdim), names


# ---------------------------------------------------------------- the probe


def state_scale(x_PxTxH: np.ndarray) -> np.ndarray:
  """Per probe, the RMS distance of states from their mean (a scalar: the probe stays linear).

  Layers differ in scale by orders of magnitude (embeddings ~0.02, the residual
  stream grows with depth); dividing by it lets one learning rate fit all.
  """
  centred = x_PxTxH - x_PxTxH.mean(axis=1, keepdims=True)
  return np.maximum(np.sqrt(np.mean(np.sum(centred ** 2, axis=-1), axis=1)), 1e-12)


def pad_sentences(n_words: Sequence[int], dists: Sequence[np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """idx_SxW (flat word index, -1 = pad), gold d_SxWxW and lengths_S."""
  width = max(n_words)
  offsets = np.concatenate([[0], np.cumsum(n_words)[:-1]])
  idx = np.full((len(n_words), width), -1, np.int32)
  d = np.zeros((len(n_words), width, width), np.float32)
  for s, (o, n, ds) in enumerate(zip(offsets, n_words, dists)):
    idx[s, :n] = np.arange(o, o + n)
    d[s, :n, :n] = ds
  return idx, d, np.asarray(n_words, np.float32)


def predicted_distances(b_PxRxH: jax.Array, x_PxTxH: jax.Array, idx_SxW: jax.Array) -> jax.Array:
  """d_PxSxWxW = ||B(h_i - h_j)||^2 for the words of each sentence (pads give garbage)."""
  y_PxSxWxR = jnp.einsum('pswh,prh->pswr', x_PxTxH[:, jnp.maximum(idx_SxW, 0)], b_PxRxH)
  sq_PxSxW = jnp.sum(y_PxSxWxR ** 2, axis=-1)
  gram = jnp.einsum('pswr,psvr->pswv', y_PxSxWxR, y_PxSxWxR)
  return jnp.maximum(sq_PxSxW[..., :, None] + sq_PxSxW[..., None, :] - 2 * gram, 0.0)


def probe_loss(b_PxRxH, x_PxTxH, idx_SxW, d_SxWxW, len_S):
  """H&M loss summed over probes: per sentence sum |d_pred - d_gold| / length^2, batch mean."""
  pred = predicted_distances(b_PxRxH, x_PxTxH, idx_SxW)
  mask = (idx_SxW[:, :, None] >= 0) & (idx_SxW[:, None, :] >= 0)
  err_PxS = jnp.sum(jnp.where(mask, jnp.abs(pred - d_SxWxW), 0.0), axis=(-2, -1)) / len_S ** 2
  return jnp.sum(jnp.mean(err_PxS, axis=1))


def train_probes(x_PxTxH: np.ndarray, idx_SxW: np.ndarray, d_SxWxW: np.ndarray,
                 len_S: np.ndarray, rank: int, steps: int, lr: float, batch_size: int,
                 seed: int) -> tuple[np.ndarray, list[float]]:
  """Trains P independent probes at once (Adam is per-coordinate, so stacking is exact)."""
  p, _, h = x_PxTxH.shape
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  b = jax.random.uniform(key, (p, rank, h), jnp.float32, -0.05, 0.05)
  tx = optax.adam(lr)
  opt = tx.init(b)
  x = jnp.asarray(x_PxTxH)

  @jax.jit
  def step(b, opt, idx, d, n):
    loss, g = jax.value_and_grad(probe_loss)(b, x, idx, d, n)
    upd, opt = tx.update(g, opt, b)
    return optax.apply_updates(b, upd), opt, loss / p

  n_sent = idx_SxW.shape[0]
  bs = min(batch_size, n_sent)
  losses = []
  for _ in range(steps):
    sel = rng.choice(n_sent, size=bs, replace=False)
    b, opt, loss = step(b, opt, idx_SxW[sel], d_SxWxW[sel], len_S[sel])
    losses.append(loss)
  return np.asarray(b), [float(v) for v in jax.device_get(losses)]


def evaluate_probes(b_PxRxH: np.ndarray, x_PxTxH: np.ndarray, idx_SxW: np.ndarray,
                    d_SxWxW: np.ndarray, sentences: Sequence[wordclass.Sentence],
                    batch_size: int = 64) -> dict[str, np.ndarray]:
  """Per probe: UUAS (micro over gold edges), DSpr (H&M, lengths 5-50) and the test loss."""
  p = b_PxRxH.shape[0]
  fn = jax.jit(predicted_distances)
  correct, total = np.zeros(p), np.zeros(p)
  spr = [[] for _ in range(p)]
  lengths = []
  x = jnp.asarray(x_PxTxH)
  loss = np.zeros(p)
  for start in range(0, idx_SxW.shape[0], batch_size):
    idx = idx_SxW[start:start + batch_size]
    pred = np.asarray(fn(jnp.asarray(b_PxRxH), x, jnp.asarray(idx)))
    for s in range(idx.shape[0]):
      sent = sentences[start + s]
      n = len(sent.forms)
      gold = d_SxWxW[start + s, :n, :n]
      lengths.append(int(np.sum(sent.upos != PUNCT_UPOS)))
      for k in range(p):
        pd = pred[k, s, :n, :n]
        c, t = uuas_counts(pd, sent.heads, sent.upos)
        correct[k] += c
        total[k] += t
        spr[k].append(sentence_spearman(pd, gold, sent.upos))
        loss[k] += np.abs(pd - gold).sum() / n ** 2
  n_sent = max(idx_SxW.shape[0], 1)
  return {'uuas': correct / np.maximum(total, 1),
          'dspr': np.array([dspr(spr[k], lengths) for k in range(p)]),
          'loss': loss / n_sent}


# ---------------------------------------------------------------- entry point


def run(setup, params, config: ml_collections.ConfigDict, out_dir: str) -> dict[str, Any]:
  """Trains and evaluates the probes for every tower and layer; writes structural_probe.json.

  Reads config.analysis.struct_* (see docs/ANALYSIS_STATS.md) and the tokenizer
  and model from `setup` (run.restore(...).setup).
  """
  ac = config.analysis
  if not ac.struct_conllu:
    raise ProbeError('the structural probe needs a treebank: set '
                     '--config.analysis.struct_conllu=PATH (CoNLL-U file, directory or glob)')
  sentences = wordclass.read_treebank(ac.struct_conllu)
  seq_len = config.data.seq_len
  kept, tokens, mats = prepare_sentences(setup.tokenizer, sentences, seq_len,
                                         ac.struct_word_repr)
  order = np.random.default_rng(ac.struct_seed).permutation(len(kept))
  order = order[:ac.struct_max_sentences] if ac.struct_max_sentences > 0 else order
  n_test = int(round(len(order) * ac.struct_test_fraction))
  if len(order) - n_test < 2 or n_test < 1:
    raise ProbeError(f'only {len(kept)} treebank sentences fit data.seq_len={seq_len}; give a '
                     'larger treebank or raise analysis.struct_max_sentences')
  order = np.concatenate([np.sort(order[n_test:]), np.sort(order[:n_test])])  # train, test
  sents = [sentences[kept[i]] for i in order]
  x_PxTxH, names = word_states(setup.model, params, tokens[order], [mats[i] for i in order],
                               ac.struct_batch_size,
                               crop=towers.get(config.model.tower_type).left_to_right)
  n_words = [len(s.forms) for s in sents]
  idx, d, lens = pad_sentences(n_words, [tree_distances(s.heads) for s in sents])
  n_train = len(sents) - n_test
  # Each split gets its own flat word array so test words never enter training.
  t_split = int(sum(n_words[:n_train]))
  idx_test = np.where(idx[n_train:] >= 0, idx[n_train:] - t_split, -1)
  rank = min(ac.struct_rank, x_PxTxH.shape[-1])
  x_PxTxH = x_PxTxH / state_scale(x_PxTxH[:, :t_split])[:, None, None]
  b, losses = train_probes(x_PxTxH[:, :t_split], idx[:n_train], d[:n_train], lens[:n_train],
                           rank, ac.struct_steps, ac.struct_lr, ac.struct_batch_size,
                           ac.struct_seed)
  res = evaluate_probes(b, x_PxTxH[:, t_split:], idx_test, d[n_train:], sents[n_train:])
  n_towers = config.model.n_towers
  shape = (n_towers, len(names))
  base = np.sum([adjacent_uuas_counts(s.heads, s.upos) for s in sents[n_train:]], axis=0)
  result = {
      'layers': names, 'n_towers': n_towers,
      'uuas': res['uuas'].reshape(shape).tolist(),  # [tower][layer]
      'dspr': res['dspr'].reshape(shape).tolist(),
      'test_loss': res['loss'].reshape(shape).tolist(),
      'train_loss_final': np.mean(np.asarray(losses[-10:])) if losses else float('nan'),
      'baseline_uuas_adjacent': float(base[0] / max(base[1], 1)),
      'n_train_sentences': n_train, 'n_test_sentences': n_test,
      'n_usable_sentences': len(kept), 'n_treebank_sentences': len(sentences),
      'rank': rank, 'steps': ac.struct_steps, 'word_repr': ac.struct_word_repr,
      'treebank': ac.struct_conllu,
  }
  result['train_loss_final'] = float(result['train_loss_final'])
  os.makedirs(out_dir, exist_ok=True)
  workdir_lib.write_json(os.path.join(out_dir, workdir_lib.STRUCT_JSON), result, indent=2)
  log.info('structural probe: best UUAS per tower %s (adjacent baseline %.3f)',
           [round(max(u), 3) for u in result['uuas']], result['baseline_uuas_adjacent'])
  return result
