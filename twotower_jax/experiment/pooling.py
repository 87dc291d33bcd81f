"""The class test pooled over seeds, and the cross-seed stability of the per-item preference.

Towers are exchangeable: which tower a seed's function words lean to is arbitrary, so
pooling signed AUCs over seeds would cancel, and pooling |AUC - 0.5| is biased upward under
the null (a folded noise is positive). Instead each seed's effect is **cross-fitted**: the
items are split in two halves by a fixed hash of their piece (the same halves for every
seed); the class test's adjusted AUC is computed on each half (A, B), and each half's effect
is oriented by the direction found on the other half:

  o = (sign(A - 1/2) (B - 1/2) + sign(B - 1/2) (A - 1/2)) / 2.

Under the null (given frequency and difficulty, labels are exchangeable within strata) A and
B come from disjoint items, so E[B - 1/2 | everything on half A] = 0 and E[o] = 0 exactly,
whatever the direction; under a split in either direction o estimates how far the effect
found on one half replicates on the other. o is unchanged by swapping the towers (A, B ->
1 - A, 1 - B), so seeds pool: DerSimonian-Laird random effects over the seeds' o, each with
its variance from a bootstrap over items (docs/EXPERIMENTS.md).

Stability: for a pair of seeds with two towers, the alignment (the sign of one seed's
preference) is chosen on one half of the items and the Spearman correlation measured on the
other half, both ways averaged, so the choice never sees the items it is measured on (the
optimistic bias analysis/compare.py documents).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any, Sequence

import numpy as np
from scipy import stats as sp_stats

from twotower_jax.analysis import class_test
from twotower_jax.analysis import stats


def item_halves(pieces: Sequence[str]) -> np.ndarray:
  """int[I] in {0, 1}: each piece's half, the low bit of the first byte of sha256(piece),
  the same in every run and on every machine (Python's hash() is salted per process)."""
  return np.array([hashlib.sha256(p.encode('utf-8')).digest()[0] & 1 for p in pieces],
                  np.int64)


def orient(a: float, b: float) -> float:
  """The cross-fitted effect of two halves' AUCs: each half's distance from 1/2, signed by
  the other half's direction, averaged (0 when either half is exactly 1/2)."""
  return float((np.sign(a - 0.5) * (b - 0.5) + np.sign(b - 0.5) * (a - 0.5)) / 2)


def _auc_draws(pref_I, labels_I, cov_CxI, n_bins: int, counts_BxI: np.ndarray) -> np.ndarray:
  """The adjusted AUC of one half under B bootstrap draws of its items, each draw given as
  the number of times it takes each item (`counts_BxI`); the spline residuals and strata
  are those of the observed items (a resampled item keeps its own, as class_test's
  interval does). Vectorised: per stratum, P(residual of positive > negative) over the
  positive x negative pairs, each pair weighted by the two items' counts."""
  resid = class_test.residuals(pref_I, cov_CxI)
  strata = class_test.strata(cov_CxI, n_bins)
  num = np.zeros(counts_BxI.shape[0])
  den = np.zeros(counts_BxI.shape[0])
  for s in np.unique(strata):
    pos = np.flatnonzero((strata == s) & labels_I)
    neg = np.flatnonzero((strata == s) & ~labels_I)
    if pos.size and neg.size:
      diff = resid[pos][:, None] - resid[neg][None, :]
      wins = (diff > 0) + 0.5 * (diff == 0)
      w_pos, w_neg = counts_BxI[:, pos], counts_BxI[:, neg]
      num += np.einsum('bi,ij,bj->b', w_pos, wins, w_neg)
      den += w_pos.sum(1) * w_neg.sum(1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def crossfit_effect(pref_I: np.ndarray, labels_I: np.ndarray, cov_CxI: np.ndarray,
                    half_I: np.ndarray, *, n_bins: int, n_boot: int, seed: int
                    ) -> dict[str, Any]:
  """One run's cross-fitted class effect o (module docstring) with its bootstrap variance.

  `pref_I`, `labels_I` (True: the positive class), `cov_CxI` (log count, item loss) are the
  class test's items; `half_I` their halves. A and B are class_test's adjusted AUC of each
  half. Each bootstrap draw resamples the items of each half with replacement (_auc_draws)
  and recomputes A, B and o; draws where a half has no stratum with both classes are
  dropped. `se` is the draws' sd, `ci` their 2.5 and 97.5 percentiles.
  """
  pref_I, labels_I = np.asarray(pref_I, np.float64), np.asarray(labels_I, bool)
  cov_CxI, half_I = np.atleast_2d(np.asarray(cov_CxI, np.float64)), np.asarray(half_I)
  keep = np.isfinite(pref_I)
  pref_I, labels_I, cov_CxI, half_I = pref_I[keep], labels_I[keep], cov_CxI[:, keep], half_I[keep]
  members = [np.flatnonzero(half_I == h) for h in (0, 1)]
  a, b = (class_test.adjusted_auc(pref_I[m], labels_I[m], cov_CxI[:, m], n_bins)
          for m in members)
  nan = float('nan')
  out = {'auc_halves': [a, b], 'effect': orient(a, b) if math.isfinite(a + b) else nan,
         'n_items_halves': [int(m.size) for m in members],
         'n_positive_halves': [int(labels_I[m].sum()) for m in members],
         'se': nan, 'ci': [nan, nan], 'n_boot': 0}
  if not math.isfinite(out['effect']):
    return out
  rng = np.random.default_rng(seed)
  a_b, b_b = (_auc_draws(pref_I[m], labels_I[m], cov_CxI[:, m], n_bins,
                         rng.multinomial(m.size, np.full(m.size, 1.0 / m.size), size=n_boot))
              for m in members)
  ok = np.isfinite(a_b) & np.isfinite(b_b)
  draws = (np.sign(a_b[ok] - 0.5) * (b_b[ok] - 0.5) + np.sign(b_b[ok] - 0.5) * (a_b[ok] - 0.5)) / 2
  if draws.size >= 2:
    out.update(se=float(draws.std(ddof=1)),
               ci=[float(x) for x in np.percentile(draws, [2.5, 97.5])], n_boot=int(draws.size))
  return out


def random_effects(effects_K: Sequence[float], variances_K: Sequence[float],
                   level: float = 0.95) -> dict[str, Any]:
  """DerSimonian-Laird random-effects pooling of K estimates with known variances.

  tau^2 = max(0, (Q - (K - 1)) / (S1 - S2 / S1)), Q the fixed-effect heterogeneity statistic,
  S1, S2 the sums of the inverse variances and of their squares; the pooled estimate weighs
  each by 1 / (v_k + tau^2). `ci` and `p_greater` (one-sided, H1: the effect is > 0) use the
  normal distribution (the DL method); `ci_hksj` and `p_greater_hksj` the Hartung-Knapp-
  Sidik-Jonkman variance with Student's t on K - 1 degrees of freedom, wider and better
  calibrated when K is small. Written here because statsmodels' combine_effects
  (method_re='dl', 0.15) does not truncate tau^2 at 0: with Q < K - 1 its weights exceed the
  fixed-effect ones and the interval is too narrow. Estimates with a non-finite or zero
  variance are left out.
  """
  y, v = np.asarray(effects_K, np.float64), np.asarray(variances_K, np.float64)
  ok = np.isfinite(y) & np.isfinite(v) & (v > 0)
  y, v = y[ok], v[ok]
  k, nan = int(y.size), float('nan')
  out = {'k': k, 'estimate': nan, 'se': nan, 'tau2': nan, 'q': nan, 'ci': [nan, nan],
         'p_greater': nan, 'ci_hksj': [nan, nan], 'p_greater_hksj': nan, 'level': level}
  if k == 0:
    return out
  w = 1.0 / v
  mu_fe = float(np.sum(w * y) / np.sum(w))
  q = float(np.sum(w * (y - mu_fe) ** 2))
  c = float(np.sum(w) - np.sum(w ** 2) / np.sum(w))
  tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 and c > 0 else 0.0
  w_re = 1.0 / (v + tau2)
  mu = float(np.sum(w_re * y) / np.sum(w_re))
  se = float(np.sqrt(1.0 / np.sum(w_re)))
  z = float(sp_stats.norm.ppf(0.5 + level / 2))
  out.update(estimate=mu, se=se, tau2=tau2, q=q, ci=[mu - z * se, mu + z * se],
             p_greater=float(sp_stats.norm.sf(mu / se)))
  if k > 1:
    se_hk = float(np.sqrt(np.sum(w_re * (y - mu) ** 2) / ((k - 1) * np.sum(w_re))))
    t = float(sp_stats.t.ppf(0.5 + level / 2, k - 1))
    out['ci_hksj'] = [mu - t * se_hk, mu + t * se_hk]
    out['p_greater_hksj'] = (float(sp_stats.t.sf(mu / se_hk, k - 1)) if se_hk > 0
                             else (0.0 if mu > 0 else 1.0))
  return out


def crossfit_spearman(a_I: np.ndarray, b_I: np.ndarray, half_I: np.ndarray,
                      align: bool = True):
  """Spearman of two runs' item preferences, each half measured with b's sign chosen on the
  other half (the sign that correlates positively there; + on a tie), averaged over the two
  halves. `align=False` (more than two towers: the preference is a sharpness, the same under
  any tower order) measures each half as it is. Rows of 2-d inputs are separate pairs (one
  value each; finite values)."""
  a, b, half_I = np.atleast_2d(a_I), np.atleast_2d(b_I), np.asarray(half_I)
  rho = [stats.row_spearman(a[:, half_I == h], b[:, half_I == h]) for h in (0, 1)]
  if align:
    sign = [np.where(r < 0, -1.0, 1.0) for r in rho]
    values = (sign[0] * rho[1] + sign[1] * rho[0]) / 2
  else:
    values = (rho[0] + rho[1]) / 2
  return values if np.ndim(a_I) == 2 else float(values[0])


def stability(prefs_RxI: np.ndarray, half_I: np.ndarray, *, align: bool, n_boot: int,
              seed: int, names: Sequence[str] | None = None) -> dict[str, Any]:
  """Cross-seed stability of R runs' preferences over the same I items: per pair of runs the
  cross-fitted Spearman (crossfit_spearman), and their mean; each with a percentile bootstrap
  interval over items (every draw resamples the items of each half and redoes the choices)."""
  prefs_RxI, half_I = np.asarray(prefs_RxI, np.float64), np.asarray(half_I)
  names = list(names) if names is not None else [str(r) for r in range(prefs_RxI.shape[0])]
  pairs = list(itertools.combinations(range(prefs_RxI.shape[0]), 2))
  nan = float('nan')
  rng = np.random.default_rng(seed)
  members = [np.flatnonzero(half_I == h) for h in (0, 1)]
  idx_BxN = np.concatenate([m[rng.integers(0, m.size, size=(n_boot, m.size))]
                            for m in members], axis=1)
  half_N = np.repeat([0, 1], [m.size for m in members])
  observed, draws = [], []
  for i, j in pairs:
    observed.append(crossfit_spearman(prefs_RxI[i], prefs_RxI[j], half_I, align))
    draws.append(crossfit_spearman(prefs_RxI[i][idx_BxN], prefs_RxI[j][idx_BxN], half_N,
                                   align))
  draws_BxP = np.stack(draws, axis=1) if draws else np.zeros((n_boot, 0))

  def interval(x):
    x = x[np.isfinite(x)]
    return [float(v) for v in np.percentile(x, [2.5, 97.5])] if x.size >= 2 else [nan, nan]

  observed = np.asarray(observed)
  return {'n_items': int(half_I.size), 'n_items_halves': [int(m.size) for m in members],
          'aligned': bool(align),
          'pairs': [{'a': names[i], 'b': names[j], 'spearman': float(observed[k]),
                     'ci': interval(draws_BxP[:, k])} for k, (i, j) in enumerate(pairs)],
          'mean': float(observed.mean()) if pairs else nan,
          'ci': interval(draws_BxP.mean(axis=1)) if pairs else [nan, nan]}
