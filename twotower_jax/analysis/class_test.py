"""The class test: do two word classes lean to different towers, beyond frequency and difficulty?

A class split (e.g. function words to one tower, content words to the other) is claimed
only when all three of these reject (an intersection-union test, docs/ANALYSIS_STATS.md):

1. **association**: after frequency and difficulty are taken out, the positive class ranks
   higher (or lower) than the negative class. The preferences are first replaced by their
   residuals from an additive cubic-spline fit on log count and the model's loss on the
   item (fitted without the labels); the statistic is the stratified AUC of the residuals,
   P(residual of a positive item > that of a negative item in the same stratum of log
   count x item loss); the null permutes the class labels within each stratum, which keeps
   every item's frequency and difficulty. A preference that follows frequency or
   difficulty is removed twice: by the fit, and (where the fit is wrong) by comparing
   only items of similar frequency and difficulty.
2. **positive lean**: the positive class's items lean to the tower the association
   points to (one-sided Wilcoxon signed-rank test of their preferences against 0);
3. **negative lean**: the negative class's items lean to the other tower.

Why 2 and 3: when one tower is simply better (longer trained, a better seed), every item
leans the same way and the gap grows with how much an item still had to be learnt, which
differs by class; 1 alone can then reject with no division of labour. Opposite leans are
what a division of labour is. The two directions are tested separately and Bonferroni
combined, p = min(1, 2 min(p_a, p_b)), p_x the largest of its three one-sided p-values.
With more than two towers the preference is a sharpness (best tower minus the others), so
only 1 applies and it says whether one class has sharper preferences.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sp_stats

from twotower_jax.analysis import stats


def strata(covariates_CxI: np.ndarray, n_bins: int) -> np.ndarray:
  """int[I]: each item's stratum, the cell of its covariates' quantile bins (n_bins each)."""
  covariates_CxI = np.atleast_2d(np.asarray(covariates_CxI, np.float64))
  cell = np.zeros(covariates_CxI.shape[1], np.int64)
  for x in covariates_CxI:
    edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1])) if x.size else []
    cell = cell * (n_bins + 1) + np.searchsorted(edges, x, side='right')
  return np.unique(cell, return_inverse=True)[1]


ITEMS_PER_TERM = 20  # one term per covariate for every 20 items (at least 1 from 8 items, up to 6)


def spline_basis(covariates_CxI: np.ndarray, terms: int = 6) -> np.ndarray:
  """float[I, 1 + terms * C]: an intercept and, per covariate (standardised), the first
  `terms` of z, z^2, z^3 and truncated cubics at the quartiles: with 6 terms an additive
  cubic spline with 3 interior knots, with 1 a straight line."""
  cols = [np.ones(np.shape(covariates_CxI)[1])]
  for x in np.atleast_2d(np.asarray(covariates_CxI, np.float64)):
    sd = x.std()
    z = (x - x.mean()) / (sd if sd > 0 else 1.0)
    knots = np.quantile(z, [0.25, 0.5, 0.75])
    cols += ([z, z ** 2, z ** 3] + [np.maximum(z - k, 0.0) ** 3 for k in knots])[:terms]
  return np.stack(cols, axis=1)


def residuals(scores_I: np.ndarray, covariates_CxI: np.ndarray) -> np.ndarray:
  """scores minus their least-squares additive-spline fit on the covariates: what frequency
  and difficulty do not explain (the fit never sees the class labels). The spline's size
  follows the items (ITEMS_PER_TERM), so a few dozen items are not fitted by as many terms."""
  n_items = np.shape(covariates_CxI)[1]
  if n_items < 8:  # too few items for any fit
    return scores_I - (scores_I.mean() if n_items else 0.0)
  terms = max(1, min(6, n_items // ITEMS_PER_TERM))
  basis = spline_basis(covariates_CxI, terms)
  coef = np.linalg.lstsq(basis, scores_I, rcond=None)[0]
  return scores_I - basis @ coef


def _by_stratum(labels_I: np.ndarray, strata_I: np.ndarray):
  """[(index of the stratum's items, n_pos, n_neg)] for strata holding both classes."""
  out = []
  for s in np.unique(strata_I):
    idx = np.flatnonzero(strata_I == s)
    n_pos = int(labels_I[idx].sum())
    if 0 < n_pos < idx.size:
      out.append((idx, n_pos, idx.size - n_pos))
  return out


def stratified_auc(scores_I: np.ndarray, labels_I: np.ndarray, strata_I: np.ndarray) -> float:
  """P(score of a positive > score of a negative in the same stratum), ties 1/2; NaN when no
  stratum holds both classes."""
  scores_I, labels_I = np.asarray(scores_I, np.float64), np.asarray(labels_I, bool)
  u = pairs = 0.0
  for idx, n_pos, n_neg in _by_stratum(labels_I, np.asarray(strata_I)):
    ranks = sp_stats.rankdata(scores_I[idx])
    u += ranks[labels_I[idx]].sum() - n_pos * (n_pos + 1) / 2
    pairs += n_pos * n_neg
  return u / pairs if pairs else float('nan')


def adjusted_auc(scores_I, labels_I, covariates_CxI, n_bins: int) -> float:
  """The class test's statistic alone (what `class_test` reports as association.auc): the
  stratified AUC of the spline residuals, for callers that recompute it on subsets of the
  items (the experiment's cross-fitted halves) without the permutation null."""
  scores_I = np.asarray(scores_I, np.float64)
  keep = np.isfinite(scores_I)
  cov = np.atleast_2d(np.asarray(covariates_CxI, np.float64))[:, keep]
  return stratified_auc(residuals(scores_I[keep], cov), np.asarray(labels_I, bool)[keep],
                        strata(cov, n_bins))


def association(scores_I, labels_I, strata_I, n_perm: int, seed: int) -> dict[str, Any]:
  """The stratified AUC and its within-stratum label-permutation null (n_perm draws).

  p_greater / p_less: one-sided, (1 + #draws at least as extreme) / (n_perm + 1); the null
  is centred at 0.5 exactly. Also the number of within-stratum pairs the AUC rests on.
  """
  scores_I, labels_I = np.asarray(scores_I, np.float64), np.asarray(labels_I, bool)
  groups = _by_stratum(labels_I, np.asarray(strata_I))
  pairs = float(sum(p * n for _, p, n in groups))
  nan = float('nan')
  if not pairs:
    return {'auc': nan, 'p_greater': nan, 'p_less': nan, 'null_sd': nan, 'n_pairs': 0,
            'n_strata': 0, 'n_perm': int(n_perm)}
  rng = np.random.default_rng(seed)
  u_obs, u_null = 0.0, np.zeros(n_perm)
  for idx, n_pos, _ in groups:
    ranks = sp_stats.rankdata(scores_I[idx])
    u_obs += ranks[labels_I[idx]].sum() - n_pos * (n_pos + 1) / 2
    chosen = np.argsort(rng.random((n_perm, idx.size)), axis=1)[:, :n_pos]
    u_null += ranks[chosen].sum(1) - n_pos * (n_pos + 1) / 2
  auc, null = u_obs / pairs, u_null / pairs
  tol = 1e-12
  return {'auc': float(auc), 'p_greater': float((1 + np.sum(null >= auc - tol)) / (n_perm + 1)),
          'p_less': float((1 + np.sum(null <= auc + tol)) / (n_perm + 1)),
          'null_sd': float(null.std(ddof=1)) if n_perm > 1 else nan, 'n_pairs': int(pairs),
          'n_strata': len(groups), 'n_perm': int(n_perm)}


def lean(scores_I: np.ndarray) -> dict[str, Any]:
  """How one class's items lean: median preference, shares above and below 0, and the one-sided
  Wilcoxon signed-rank p-values of 'they lean to tower 0' (> 0) and 'to tower 1' (< 0)."""
  x = np.asarray(scores_I, np.float64)
  x = x[np.isfinite(x)]
  nan = float('nan')
  if x.size == 0:
    return {'n': 0, 'median': nan, 'share_positive': nan, 'p_positive': nan, 'p_negative': nan}
  out = {'n': int(x.size), 'median': float(np.median(x)), 'share_positive': float(np.mean(x > 0)),
         'share_negative': float(np.mean(x < 0))}
  if not np.any(x != 0):  # no item leans at all
    return dict(out, p_positive=1.0, p_negative=1.0)
  for key, alt in (('p_positive', 'greater'), ('p_negative', 'less')):
    out[key] = float(sp_stats.wilcoxon(x, zero_method='wilcox', alternative=alt).pvalue)
  return out


def _interval(boot_scores_BxI, labels_I, cov_CxI, strata_I, seed: int) -> list[float]:
  """95% percentile interval of the adjusted AUC: each draw takes one document resample of
  the item scores (a row of boot_scores_BxI), adjusts it, and resamples the items with
  replacement."""
  if boot_scores_BxI is None or len(boot_scores_BxI) == 0:
    return [float('nan'), float('nan')]
  rng = np.random.default_rng(seed + 1)
  values = []
  for scores_I in boot_scores_BxI:
    ok = np.flatnonzero(np.isfinite(scores_I))  # items absent from the resampled documents
    if ok.size < 2:
      continue
    resid = residuals(scores_I[ok], cov_CxI[:, ok])
    idx = rng.integers(0, ok.size, size=ok.size)
    # a resampled item keeps its own stratum; duplicates are distinct items of it
    values.append(stratified_auc(resid[idx], labels_I[ok][idx], strata_I[ok][idx]))
  values = np.asarray(values)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return [float('nan'), float('nan')]
  return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def class_test(scores_I, labels_I, covariates_CxI, *, n_bins: int, n_perm: int, seed: int,
               two_towers: bool = True, boot_scores_BxI=None) -> dict[str, Any]:
  """The class test of the module docstring for one pair of classes (labels True = positive).

  `covariates_CxI`: what the strata hold fixed (log count, item loss). `boot_scores_BxI`:
  the item scores under document resamples, for the stratified AUC's interval. Returns the
  plain AUC, the association block, each class's lean, `p` and `direction` ('positive->0':
  the positive class leans to tower 0 and the negative class to tower 1; 'positive->1'; ''
  when untestable).
  """
  scores_I = np.asarray(scores_I, np.float64)
  labels_I = np.asarray(labels_I, bool)
  keep = np.isfinite(scores_I)
  scores_I, labels_I = scores_I[keep], labels_I[keep]
  cov = np.atleast_2d(np.asarray(covariates_CxI, np.float64))[:, keep]
  if boot_scores_BxI is not None:
    boot_scores_BxI = np.asarray(boot_scores_BxI, np.float64)[:, keep]
  strata_I = strata(cov, n_bins)
  assoc = association(residuals(scores_I, cov), labels_I, strata_I, n_perm, seed)
  assoc['ci'] = _interval(boot_scores_BxI, labels_I, cov, strata_I, seed)
  out = {'auc_unadjusted': stats.auc(scores_I, labels_I), 'association': assoc,
         'n_positive': int(labels_I.sum()), 'n_negative': int((~labels_I).sum()),
         'n_bins': int(n_bins)}
  if not two_towers:
    p = min(1.0, 2 * min(assoc['p_greater'], assoc['p_less']))
    direction = '' if not math.isfinite(p) else (
        'positive_sharper' if assoc['auc'] > 0.5 else 'negative_sharper')
    return dict(out, p=p, direction=direction)
  pos, neg = lean(scores_I[labels_I]), lean(scores_I[~labels_I])
  p_a = max(assoc['p_greater'], pos['p_positive'], neg['p_negative'])  # positive -> tower 0
  p_b = max(assoc['p_less'], pos['p_negative'], neg['p_positive'])  # positive -> tower 1
  p = min(1.0, 2 * min(p_a, p_b)) if math.isfinite(p_a) and math.isfinite(p_b) else float('nan')
  direction = '' if not math.isfinite(p) else ('positive->0' if p_a <= p_b else 'positive->1')
  return dict(out, lean_positive=pos, lean_negative=neg, p=p, direction=direction)
