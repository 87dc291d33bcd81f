"""The statistics of the analysis: per estimator, over the items seen at least min_count times.

Bimodality against the control, the link to frequency, closed-class enrichment, the
top items per tower, the planted classes' separation, and the agreement between
estimators. Plain numpy on the per-item results; written to summary.json.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import stats
from twotower_jax.analysis import wordclass
from twotower_jax.data import planted

N_FREQ_BINS = 4


def _nan(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else float('nan')


def frequency_stats(pref, count, closed, opened, n_boot, seed) -> dict[str, Any]:
  """Spearman of preference with log count (CI) and results within count quantile bins."""
  if count.size == 0:
    return {'spearman_logfreq': float('nan'), 'ci': [float('nan')] * 2, 'bins': []}
  logc = np.log(count)
  rho = stats.spearman(pref, logc)
  ci = stats.bootstrap_ci(stats.spearman, (pref, logc), n_boot=n_boot, seed=seed)
  edges = np.unique(np.quantile(count, np.linspace(0, 1, N_FREQ_BINS + 1)))
  bins = []
  for i in range(len(edges) - 1):
    lo, hi = edges[i], edges[i + 1]
    m = (count >= lo) & ((count <= hi) if i == len(edges) - 2 else (count < hi))
    known = m & (closed | opened)
    bins.append({'lo': float(lo), 'hi': float(hi), 'n': int(m.sum()),
                 'mean_pref': _nan(np.mean(pref[m])) if m.any() else float('nan'),
                 'auc_closed': stats.auc(pref[known], closed[known])})
  return {'spearman_logfreq': rho, 'ci': list(ci), 'bins': bins}


def class_stats(pref, ctrl_KxI, closed, opened, source, n_boot, seed) -> dict[str, Any]:
  """AUC of closed-class words ranking toward tower 0 (pref > 0), with a bootstrap CI and
  its test against the control's AUCs (`null`)."""
  known = closed | opened
  s, lab = pref[known], closed[known]
  auc = stats.auc(s, lab)
  return {'source': source, 'auc': auc,
          'ci': list(stats.bootstrap_ci(stats.auc, (s, lab), n_boot=n_boot, seed=seed)),
          'null': stats.null_test(auc, [stats.auc(c[known], lab) for c in ctrl_KxI]),
          'n_closed': int(closed.sum()), 'n_open': int(opened.sum()),
          'mean_pref_closed': _nan(np.mean(pref[closed])) if closed.any() else float('nan'),
          'mean_pref_open': _nan(np.mean(pref[opened])) if opened.any() else float('nan')}


def top_items(res, pieces, keep, n_towers) -> dict[str, list[dict[str, Any]]]:
  """Per tower the k items that lean to it most (two towers: by sign of the preference)."""
  idx = np.nonzero(keep)[0]
  out = {}
  for k in range(max(n_towers, 2)):
    if n_towers <= 2:
      order = idx[np.argsort(-res['pref'][idx] if k == 0 else res['pref'][idx], kind='stable')]
    else:
      mine = idx[res['best'][idx] == k]
      order = mine[np.argsort(-res['pref'][mine], kind='stable')]
    out[f'tower_{k}'] = [{'piece': pieces[i], 'token_id': int(i), 'count': int(res['count'][i]),
                          'pref': float(res['pref'][i])} for i in order[:workdir_lib.TOP_K]]
  return out


def estimator_summary(res, pieces, classes, n_towers, config, planted_V=None) -> dict[str, Any]:
  """Every statistic of one estimator over the items with count >= min_count."""
  a = config.analysis
  keep = (res['count'] >= a.min_count) & np.isfinite(res['pref'])
  pref, count = res['pref'][keep], res['count'][keep]
  closed, opened = wordclass.class_masks(classes['word_class'])
  closed, opened = closed[keep], opened[keep]
  ctrl_KxI = res['control_pref_KxV'][:, keep]
  ctrl = ctrl_KxI[0]
  finite = np.concatenate([pref, ctrl])
  finite = finite[np.isfinite(finite)]
  edges = (np.linspace(finite.min(), finite.max(), 31) if finite.size and finite.min() < finite.max()
           else np.linspace(-1, 1, 31))
  kind = 'split_single_tower' if n_towers == 1 else 'shuffled_labels'
  bimodality = stats.bimodality(pref)
  out = {
      'n_items': int(keep.sum()),
      'n_positions': int(res['count'].sum()),
      'bimodality': bimodality,
      'control': {'kind': kind, 'bimodality': stats.bimodality(ctrl),
                  'null': stats.null_test(bimodality, [stats.bimodality(c) for c in ctrl_KxI])},
      'histogram': {'edges': edges.tolist(), 'counts': np.histogram(pref, edges)[0].tolist(),
                    'control_counts': np.histogram(ctrl[np.isfinite(ctrl)], edges)[0].tolist()},
      'frequency': frequency_stats(pref, count, closed, opened, a.n_boot, a.seed),
      'class_enrichment': class_stats(pref, ctrl_KxI, closed, opened, classes['source'],
                                      a.n_boot, a.seed),
      'top_items': top_items(res, pieces, keep, n_towers),
      'seconds': float(res['seconds'] + res['prepare_seconds']),
      'tokens_per_s': float(res['tokens_per_s']),
  }
  if planted_V is not None:  # how well the preference separates the planted classes
    out['planted'] = class_separation(res['pref'], planted_V, res['count'], a.min_count,
                                      a.n_boot, a.seed, res['control_pref_KxV'])
  return out


def agreement(results, min_count, n_boot, seed) -> dict[str, Any]:
  """Spearman between every pair of estimators' preferences (items with enough counts)."""
  names = list(results)
  out = {}
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      ra, rb = results[a], results[b]
      m = (ra['count'] >= min_count) & np.isfinite(ra['pref']) & np.isfinite(rb['pref'])
      x, y = ra['pref'][m], rb['pref'][m]
      out[f'{a}~{b}'] = {'spearman': stats.spearman(x, y), 'n': int(m.sum()),
                         'ci': list(stats.bootstrap_ci(stats.spearman, (x, y), n_boot=n_boot,
                                                       seed=seed))}
  return out


def class_separation(pref_V: np.ndarray, classes_V: np.ndarray, counts_V: np.ndarray,
                     min_count: int = 1, n_boot: int = 1000, seed: int = 0,
                     control_KxV: np.ndarray | None = None) -> dict:
  """AUC of the preference for telling syntax (positive) from topic items, with a 95% CI
  and, given the control's preferences, its test against the control's AUCs (`null`).

  Items: classified pieces with count >= min_count and a finite preference. AUC > 0.5
  means syntax words lean to tower 0 (positive preference), < 0.5 to tower 1; towers
  are exchangeable, so |AUC - 0.5| is the strength of the split. The CI resamples items.
  """
  pref_V, classes_V = np.asarray(pref_V, np.float64), np.asarray(classes_V)
  keep = (classes_V >= 0) & (np.asarray(counts_V) >= min_count) & np.isfinite(pref_V)
  scores, labels = pref_V[keep], classes_V[keep] == planted.SYNTAX
  auc = stats.auc(scores, labels)
  lo, hi = stats.bootstrap_ci(stats.auc, (scores, labels), n_boot=n_boot, seed=seed)
  out = {'auc': auc, 'ci': [lo, hi], 'n_syntax': int(labels.sum()),
         'n_topic': int((~labels).sum())}
  if control_KxV is not None:
    out['null'] = stats.null_test(auc, [stats.auc(c[keep], labels) for c in control_KxV])
  return out
