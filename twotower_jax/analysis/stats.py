"""Statistics the analysis reports: AUC, bootstrap intervals, bimodality, correlations.

Plain numpy/scipy functions of arrays, so every number in a report can be
recomputed from preference.csv alone. Degenerate inputs (one class, constant
values, too few items) give NaN rather than an exception: a report then shows
'n/a' for that statistic instead of failing the whole analysis.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats as sp_stats


def auc(scores_N: np.ndarray, labels_N: np.ndarray) -> float:
  """P(score of a random positive > score of a random negative), ties count 0.5.

  The Mann-Whitney U statistic of the positives over n_pos * n_neg (scipy.stats);
  NaN when either class is empty.
  """
  scores_N = np.asarray(scores_N, dtype=np.float64).reshape(-1)
  labels_N = np.asarray(labels_N, dtype=bool).reshape(-1)
  if scores_N.shape != labels_N.shape:
    raise ValueError(f'auc: {scores_N.shape[0]} scores but {labels_N.shape[0]} labels')
  n_pos = int(labels_N.sum())
  n_neg = labels_N.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  u = sp_stats.mannwhitneyu(scores_N[labels_N], scores_N[~labels_N], method='asymptotic').statistic
  return float(u / (n_pos * n_neg))


def bootstrap_ci(statistic: Callable[..., float], arrays: Sequence[np.ndarray],
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
  """Percentile interval of `statistic(*arrays)` over resamples of the rows (axis 0).

  All arrays are resampled with the same row indices, so paired data stay paired.
  Resamples where the statistic is NaN (e.g. one class drawn only) are ignored; that
  is why this is not scipy.stats.bootstrap, whose interval turns NaN when any
  resample is undefined (and which casts boolean labels to floats).
  """
  if isinstance(arrays, np.ndarray):  # one array given bare: do not iterate its rows
    arrays = (arrays,)
  arrays = tuple(np.asarray(a) for a in arrays)
  if not arrays:
    raise ValueError('bootstrap_ci needs at least one array')
  n = arrays[0].shape[0]
  if any(a.shape[0] != n for a in arrays):
    raise ValueError('bootstrap_ci: arrays differ in length along axis 0')
  if n == 0:
    return float('nan'), float('nan')
  rng = np.random.default_rng(seed)
  values = np.empty(n_boot, dtype=np.float64)
  for b in range(n_boot):
    idx = rng.integers(0, n, size=n)
    values[b] = statistic(*(a[idx] for a in arrays))
  values = values[np.isfinite(values)]
  if values.size == 0:
    return float('nan'), float('nan')
  lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return float(lo), float(hi)


def bimodality(values: np.ndarray) -> float:
  """Sarle's bimodality coefficient b = (g^2 + 1) / (k + 3 (n-1)^2 / ((n-2)(n-3))).

  g and k are the sample skewness and excess kurtosis with the small-sample bias
  correction. b > 5/9 (0.555, the value for a uniform distribution) suggests two
  modes; a normal sample gives about 1/3. NaN for fewer than 4 values or constant.
  """
  x = np.asarray(values, dtype=np.float64).reshape(-1)
  x = x[np.isfinite(x)]
  n = x.size
  if n < 4 or np.all(x == x[0]):
    return float('nan')
  g = sp_stats.skew(x, bias=False)
  k = sp_stats.kurtosis(x, fisher=True, bias=False)
  return float((g ** 2 + 1.0) / (k + 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


def _paired_finite(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(a, dtype=np.float64).reshape(-1)
  b = np.asarray(b, dtype=np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f'correlation of arrays of different lengths ({a.size} vs {b.size})')
  keep = np.isfinite(a) & np.isfinite(b)
  return a[keep], b[keep]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
  """Pearson correlation over pairs where both are finite; NaN if either is constant."""
  a, b = _paired_finite(a, b)
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float('nan')
  a, b = a - a.mean(), b - b.mean()
  return float(np.clip((a @ b) / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation over pairs where both are finite (scipy.stats.spearmanr);
  NaN if either is constant."""
  a, b = _paired_finite(a, b)
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float('nan')
  return float(sp_stats.spearmanr(a, b).statistic)


def row_spearman(a_RxC: np.ndarray, b_RxC: np.ndarray) -> np.ndarray:
  """Spearman of each row of `a` with the same row of `b`, all rows at once (finite inputs;
  average ranks for ties, as `spearman`); NaN for a row where either side is constant."""
  ra, rb = (sp_stats.rankdata(x, axis=1) for x in (a_RxC, b_RxC))
  ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
  denom = np.sqrt(np.sum(ra ** 2, axis=1) * np.sum(rb ** 2, axis=1))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denom > 0, np.sum(ra * rb, axis=1) / denom, np.nan)


def permutation_test(statistic: Callable[[np.ndarray, np.ndarray], float], x: np.ndarray,
                     labels: np.ndarray, n_perm: int = 1000, seed: int = 0) -> dict[str, float]:
  """Shuffled-label control: the statistic's null distribution when labels are permuted.

  Returns the observed value, the null mean and 2.5/97.5 percentiles, and a
  two-sided p-value (distance from the null mean), with the +1 correction so a
  p-value is never 0.
  """
  x, labels = np.asarray(x), np.asarray(labels)
  observed = float(statistic(x, labels))
  rng = np.random.default_rng(seed)
  null = np.array([statistic(x, rng.permutation(labels)) for _ in range(n_perm)], np.float64)
  null = null[np.isfinite(null)]
  if null.size == 0 or not np.isfinite(observed):
    nan = float('nan')
    return {'observed': observed, 'null_mean': nan, 'null_lo': nan, 'null_hi': nan, 'p': nan}
  centre = null.mean()
  extreme = np.sum(np.abs(null - centre) >= abs(observed - centre))
  lo, hi = np.percentile(null, [2.5, 97.5])
  return {'observed': observed, 'null_mean': float(centre), 'null_lo': float(lo),
          'null_hi': float(hi), 'p': float((extreme + 1) / (null.size + 1))}


def null_test(observed: float, null_K: np.ndarray) -> dict[str, float]:
  """The observed statistic against its distribution under a control (K draws).

  p: two-sided, the share of draws at least as far from the null's mean as the observed
  value, with the +1 correction (never 0; the smallest is 1/(K+1)). effect: the distance
  from the null's mean in null standard deviations. NaN where either is undefined.
  """
  null_K = np.asarray(null_K, np.float64)
  null_K = null_K[np.isfinite(null_K)]
  nan = float('nan')
  if null_K.size < 2 or not np.isfinite(observed):
    return {'null_mean': nan, 'null_sd': nan, 'p': nan, 'effect': nan, 'n_null': int(null_K.size)}
  centre, sd = float(null_K.mean()), float(null_K.std(ddof=1))
  extreme = np.sum(np.abs(null_K - centre) >= abs(observed - centre))
  return {'null_mean': centre, 'null_sd': sd, 'p': float((extreme + 1) / (null_K.size + 1)),
          'effect': float((observed - centre) / sd) if sd > 0 else nan,
          'n_null': int(null_K.size)}
