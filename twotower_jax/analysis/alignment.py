"""How alike two token matrices are: row i of each is token i of one tokenizer.

Four measures, each a similarity (1 = the same matrix up to what it ignores), and each
unbiased enough that two unrelated matrices score about 0 at any number of tokens:
- `cka`: debiased linear CKA (Kornblith et al. 2019, with Song et al.'s unbiased HSIC, so
  random matrices give ~0 rather than ~width/tokens); ignores rotations and an overall
  scale of either matrix, and the widths may differ.
- `knn`: per token, the share of its k nearest neighbours (cosine) that are the same in
  both matrices, averaged over tokens; ignores rotations and each row's length. Chance
  level is about k / tokens.
- `procrustes`: 1 - r / 2, r the residual of the best orthogonal map
  (scipy.linalg.orthogonal_procrustes) between the column-centred matrices scaled to unit
  Frobenius norm (r in [0, 2] in-sample, about 2 for unrelated matrices). Cross-fitted:
  tokens are split in two halves and each half's residual uses the map fitted on the
  other, so the map cannot fit noise. A narrower matrix is padded with zero columns.
- `row_cosine`: the mean cosine between token i's two rows without any alignment: it
  reads the coordinates themselves, so rotating one matrix changes it (it is high only
  for matrices that share their basis, e.g. trained from one initialisation). NaN when
  the widths differ.

Intervals: percentile bootstrap over tokens. knn, procrustes and row_cosine resample
their per-token values; cka reweights the tokens and leaves out the pairs of a token
with its own copies (a token drawn twice is not evidence of alignment).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import linalg

MEASURES = ('cka', 'knn', 'procrustes', 'row_cosine')
ROTATION_INVARIANT = ('cka', 'knn', 'procrustes')


def _hsic(cross_sq: float, diag_T: np.ndarray, sums_T: np.ndarray, total: float,
          w_T: np.ndarray, diag2_T: np.ndarray, sums2_T: np.ndarray, total2: float) -> float:
  """Song et al.'s unbiased HSIC of two linear kernels K = XX', L = YY' from feature-space
  sums, rows weighted by w (copies of one token never paired).

  cross_sq = ||X'WY||_F^2; diag_T = k_tt; sums_T = x_t . X'w; total = ||X'w||^2 (and
  the same for Y: diag2_T, sums2_T, total2).
  """
  n = float(w_T.sum())
  ww = w_T * w_T
  t1 = cross_sq - np.sum(ww * diag_T * diag2_T)
  s_k, s_l = total - np.sum(ww * diag_T), total2 - np.sum(ww * diag2_T)
  a_T, b_T = sums_T - w_T * diag_T, sums2_T - w_T * diag2_T
  t3 = np.sum(w_T * a_T * b_T)
  return (t1 + s_k * s_l / ((n - 1) * (n - 2)) - 2.0 * t3 / (n - 2)) / (n * (n - 3))


def linear_cka(x_TxA: np.ndarray, y_TxB: np.ndarray, w_T: np.ndarray | None = None) -> float:
  """Debiased linear CKA: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), rows weighted by w."""
  w_T = np.ones(x_TxA.shape[0]) if w_T is None else np.asarray(w_T, np.float64)
  x = x_TxA - x_TxA.mean(axis=0)  # for precision only: the unbiased HSIC ignores shifts
  y = y_TxB - y_TxB.mean(axis=0)
  dx, dy = np.sum(x * x, axis=1), np.sum(y * y, axis=1)
  mx, my = x.T @ w_T, y.T @ w_T
  sx, sy = x @ mx, y @ my
  xw, yw = x * w_T[:, None], y * w_T[:, None]

  def hsic(a, b, da, db, sa, sb, ta, tb):
    return _hsic(float(np.sum((a.T @ b) ** 2)), da, sa, ta, w_T, db, sb, tb)

  xy = hsic(xw, y, dx, dy, sx, sy, mx @ mx, my @ my)
  xx = hsic(xw, x, dx, dx, sx, sx, mx @ mx, mx @ mx)
  yy = hsic(yw, y, dy, dy, sy, sy, my @ my, my @ my)
  return float(xy / np.sqrt(xx * yy)) if xx > 0 and yy > 0 else float('nan')


def procrustes_residual_per_token(x_TxA: np.ndarray, y_TxB: np.ndarray,
                                  seed: int = 0) -> np.ndarray:
  """r_T: ||x_t R - y_t||^2 of the centred, unit-Frobenius matrices, R the orthogonal map
  fitted on the other half of the tokens (two folds, drawn from `seed`); sums to the
  cross-fitted residual."""
  width = max(x_TxA.shape[1], y_TxB.shape[1])
  x = np.pad(x_TxA - x_TxA.mean(axis=0), ((0, 0), (0, width - x_TxA.shape[1])))
  y = np.pad(y_TxB - y_TxB.mean(axis=0), ((0, 0), (0, width - y_TxB.shape[1])))
  nx, ny = np.linalg.norm(x), np.linalg.norm(y)
  if nx == 0 or ny == 0:
    return np.full(x.shape[0], np.nan)
  x, y = x / nx, y / ny
  fold_T = np.random.default_rng(seed).permutation(x.shape[0]) % 2
  r_T = np.empty(x.shape[0])
  for f in (0, 1):
    fit, test = fold_T != f, fold_T == f
    rot, _ = linalg.orthogonal_procrustes(x[fit], y[fit])
    r_T[test] = np.sum((x[test] @ rot - y[test]) ** 2, axis=1)
  return r_T


def _unit_rows(x_TxA: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(x_TxA, axis=1, keepdims=True)
  return x_TxA / np.maximum(n, 1e-30)


def neighbours(x_TxA: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  """idx_TxK: each row's k nearest other rows by cosine similarity (ties: lower index)."""
  u = _unit_rows(np.asarray(x_TxA, np.float64))
  t = u.shape[0]
  out = np.empty((t, k), np.int64)
  for start in range(0, t, chunk):
    sim = u[start:start + chunk] @ u.T
    rows = np.arange(sim.shape[0])
    sim[rows, start + rows] = -np.inf  # not its own neighbour
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(sim, part, 1)), axis=1)
    out[start:start + chunk] = np.take_along_axis(part, order, 1)
  return out


def knn_overlap_per_token(x_TxA: np.ndarray, y_TxB: np.ndarray, k: int) -> np.ndarray:
  """Per token: |N_x(i) & N_y(i)| / k, N the k nearest neighbours by cosine."""
  nx, ny = neighbours(x_TxA, k), neighbours(y_TxB, k)
  both = np.concatenate([nx, ny], axis=1)
  both.sort(axis=1)
  return np.sum(both[:, 1:] == both[:, :-1], axis=1) / k  # a shared index appears twice


def row_cosine_per_token(x_TxA: np.ndarray, y_TxB: np.ndarray) -> np.ndarray | None:
  """Per token: cos(x_i, y_i) in the matrices' own coordinates; None when widths differ."""
  if x_TxA.shape[1] != y_TxB.shape[1]:
    return None
  return np.sum(_unit_rows(x_TxA) * _unit_rows(y_TxB), axis=1)


def compare(x_TxA: np.ndarray, y_TxB: np.ndarray, k: int = 10, n_boot: int = 200,
            seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Any]]:
  """{measure: {'value', 'ci': [lo, hi]}} of two matrices over the same T tokens."""
  x = np.asarray(x_TxA, np.float64)
  y = np.asarray(y_TxB, np.float64)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f'the matrices have {x.shape[0]} and {y.shape[0]} rows; give both the same '
                     'tokens')
  t = x.shape[0]
  if t < 8:
    raise ValueError(f'{t} tokens are too few to compare two matrices; give at least 8')
  k = min(k, t - 1)
  rng = np.random.default_rng(seed)
  counts_RxT = rng.multinomial(t, np.full(t, 1.0 / t), size=n_boot).astype(np.float64)
  q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
  out = {'cka': {'value': linear_cka(x, y),
                 'ci': list(np.nanpercentile([linear_cka(x, y, w) for w in counts_RxT], q))}}
  per_token = {'knn': knn_overlap_per_token(x, y, k),
               'procrustes': 1.0 - t * procrustes_residual_per_token(x, y, seed) / 2.0,
               'row_cosine': row_cosine_per_token(x, y)}
  for name, values_T in per_token.items():
    if values_T is None:
      out[name] = {'value': float('nan'), 'ci': [float('nan'), float('nan')]}
      continue
    out[name] = {'value': float(values_T.mean()),
                 'ci': list(np.percentile(counts_RxT @ values_T / t, q))}
  out['knn']['k'] = int(k)
  return {name: out[name] for name in MEASURES}
