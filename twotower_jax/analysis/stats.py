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
  """Pearson correlation over pairs where both are finite (scipy.stats.pearsonr); NaN if
  either is constant."""
  a, b = _paired_finite(a, b)
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float('nan')
  return float(sp_stats.pearsonr(a, b).statistic)


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


def null_test(observed: float, null_K: np.ndarray,
              alternative: str = 'two-sided') -> dict[str, float]:
  """The observed statistic against its distribution under a control (K draws).

  p: the share of draws at least as extreme as the observed value, with the +1 correction
  (never 0; the smallest is 1/(K+1)): 'two-sided' measures distance from the draws' mean,
  'greater' counts draws >= the observed value. effect: the distance from the draws' mean
  in their standard deviations. NaN where either is undefined.
  """
  null_K = np.asarray(null_K, np.float64)
  null_K = null_K[np.isfinite(null_K)]
  nan = float('nan')
  if null_K.size < 2 or not np.isfinite(observed):
    return {'null_mean': nan, 'null_sd': nan, 'p': nan, 'effect': nan, 'n_null': int(null_K.size),
            'alternative': alternative}
  centre, sd = float(null_K.mean()), float(null_K.std(ddof=1))
  if alternative == 'greater':
    extreme = np.sum(null_K >= observed)
  else:
    extreme = np.sum(np.abs(null_K - centre) >= abs(observed - centre))
  return {'null_mean': centre, 'null_sd': sd, 'p': float((extreme + 1) / (null_K.size + 1)),
          'effect': float((observed - centre) / sd) if sd > 0 else nan,
          'n_null': int(null_K.size), 'alternative': alternative}


def holm(p_values: dict[str, float]) -> dict[str, float]:
  """Holm's step-down adjustment of a family of p-values (NaN ones are left out and stay NaN).

  Written here because scipy.stats offers only the Benjamini-Hochberg procedure
  (false_discovery_control); Holm controls the family-wise error, which a yes/no claim needs.
  """
  finite = sorted((p, k) for k, p in p_values.items() if np.isfinite(p))
  m, out, running = len(finite), {k: float('nan') for k in p_values}, 0.0
  for i, (p, k) in enumerate(finite):
    running = max(running, min(1.0, (m - i) * p))
    out[k] = running
  return out


def binomial_ci(k: int, n: int, level: float = 0.95) -> list[float]:
  """Clopper-Pearson interval of a rate k/n (scipy.stats.binomtest); NaN for n = 0."""
  if n == 0:
    return [float('nan'), float('nan')]
  ci = sp_stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method='exact')
  return [float(ci.low), float(ci.high)]


def cluster_mean_ci(sum_GxI: np.ndarray, count_GxI: np.ndarray,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per item: the mean of its values and a cluster-robust interval, clusters = documents.

  sum_GxI, count_GxI: each item's summed value and number of values per cluster G (dense or
  scipy.sparse). The variance of a ratio mean is CR1, (G_i/(G_i-1)) sum_g (S_g - n_g m)^2 / n^2
  over the G_i clusters holding the item, and the interval uses Student's t with G_i - 1
  degrees of freedom: occurrences within one document are not independent. NaN for an item
  seen in fewer than two documents. Returns (mean_I, lo_I, hi_I).
  """
  s_sum = np.asarray(sum_GxI.sum(0), np.float64).reshape(-1)
  n_sum = np.asarray(count_GxI.sum(0), np.float64).reshape(-1)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean = s_sum / n_sum
    s2 = np.asarray(sum_GxI.multiply(sum_GxI).sum(0) if hasattr(sum_GxI, 'multiply')
                    else (sum_GxI ** 2).sum(0), np.float64).reshape(-1)
    sn = np.asarray(sum_GxI.multiply(count_GxI).sum(0) if hasattr(sum_GxI, 'multiply')
                    else (sum_GxI * count_GxI).sum(0), np.float64).reshape(-1)
    n2 = np.asarray(count_GxI.multiply(count_GxI).sum(0) if hasattr(count_GxI, 'multiply')
                    else (count_GxI ** 2).sum(0), np.float64).reshape(-1)
    g = np.asarray((count_GxI > 0).sum(0), np.float64).reshape(-1)
    resid = np.maximum(s2 - 2 * mean * sn + mean ** 2 * n2, 0.0)
    se = np.sqrt(g / (g - 1) * resid) / n_sum
    half = sp_stats.t.ppf(0.5 + level / 2, np.maximum(g - 1, 1)) * se
  few = ~(g >= 2)
  lo, hi = mean - half, mean + half
  lo[few], hi[few] = np.nan, np.nan
  return mean, lo, hi
