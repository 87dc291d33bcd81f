"""The statistics of the analysis: per estimator, over the items seen at least min_count times.

Two kinds of test (docs/ANALYSIS_STATS.md): "some items prefer a tower" (`prefer`, and the
bimodality, against the towers shuffled at every occurrence) and the class tests
(class_test.py: function vs content words, punctuation vs content words, planted syntax vs
topic items). Also the link to frequency, the top items per tower and the agreement between
estimators. Plain numpy on the per-item results; written to summary.json.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import class_test
from twotower_jax.analysis import clusters
from twotower_jax.analysis import stats
from twotower_jax.data import planted

N_FREQ_BINS = 4
MIN_ITEMS = 4  # fewer items than this: bimodality and most statistics are undefined


def _nan(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else float('nan')


def frequency_stats(pref, count, closed, opened, n_boot, seed) -> dict[str, Any]:
  """Spearman of preference with log count (CI) and results within count quantile bins.

  No items (none reached min_count): every number NaN ('n/a') and no bins.
  """
  if count.size == 0:
    nan = float('nan')
    return {'spearman_logfreq': nan, 'ci': [nan, nan], 'bins': []}
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


def class_block(pref, labels_pos, labels_neg, ctx: dict[str, Any], seed_offset: int = 0
                ) -> dict[str, Any]:
  """The class test (class_test.py) of one pair of item classes among the kept items, with
  the plain and the normalised AUC beside it and each class's mean preference.

  `ctx`: the kept items' covariates (`cov_CxI`), document-resampled preferences (`boot_BxI`),
  normalised preferences (`pref_norm`), the analysis config (`a`) and `two_towers`.
  """
  a = ctx['a']
  m = labels_pos | labels_neg
  nan = float('nan')
  out = {'n_positive': int(labels_pos.sum()), 'n_negative': int(labels_neg.sum()),
         'mean_pref_positive': _nan(np.mean(pref[labels_pos])) if labels_pos.any() else nan,
         'mean_pref_negative': _nan(np.mean(pref[labels_neg])) if labels_neg.any() else nan,
         'auc_normalized': stats.auc(ctx['pref_norm'][m], labels_pos[m])}
  boot = ctx['boot_BxI'][:, m] if ctx['boot_BxI'] is not None else None
  test = class_test.class_test(pref[m], labels_pos[m], ctx['cov_CxI'][:, m],
                               n_bins=int(a.strata_bins), n_perm=int(a.n_perm),
                               seed=int(a.seed) + seed_offset, two_towers=ctx['two_towers'],
                               boot_scores_BxI=boot)
  out.update(test=test, auc=test['association']['auc'], ci=test['association']['ci'],
             auc_unadjusted=test['auc_unadjusted'], p=test['p'])
  if int(a.control_class_tests):  # the same test where no preference exists (validate's null)
    out['control_p'] = [class_test.class_test(
        c[m], labels_pos[m], ctx['cov_CxI'][:, m], n_bins=int(a.strata_bins),
        n_perm=min(int(a.n_perm), 999), seed=int(a.seed) + seed_offset + 7 * (k + 1),
        two_towers=ctx['two_towers'])['p'] for k, c in enumerate(
            ctx['ctrl_KxI'][:int(a.control_class_tests)])]
  return out


def prefer_test(pref, ctrl_KxI) -> dict[str, Any]:
  """"Some items prefer a tower": the mean squared preference against its distribution when
  the towers are shuffled at every occurrence (one-sided: larger than shuffled)."""
  stat = float(np.mean(pref ** 2)) if pref.size else float('nan')
  return {'statistic': stat, 'what': 'mean squared preference',
          'null': stats.null_test(stat, np.mean(ctrl_KxI ** 2, axis=1) if pref.size else [],
                                  alternative='greater')}


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


def _bimodality_all(x_KxI: np.ndarray) -> np.ndarray:
  return np.array([stats.bimodality(x) for x in x_KxI])


def estimator_summary(res, pieces, classes, n_towers, config, item_loss_V,
                      planted_V=None, alt_classes=None) -> dict[str, Any]:
  """Every statistic of one estimator over the items with count >= min_count.

  `item_loss_V`: the model's mean loss per item (a class test stratum). `alt_classes`: a
  second word-class source (the built-in list beside a treebank), tested as a sensitivity
  check.
  """
  a = config.analysis
  keep = (res['count'] >= a.min_count) & np.isfinite(res['pref'])
  items = np.flatnonzero(keep)
  pref, count = res['pref'][keep], res['count'][keep]
  ctrl_KxI = res['control_pref_KxV'][:, keep]
  ctrl = ctrl_KxI[0]
  finite = np.concatenate([pref, ctrl])
  finite = finite[np.isfinite(finite)]
  edges = (np.linspace(finite.min(), finite.max(), 31) if finite.size and finite.min() < finite.max()
           else np.linspace(-1, 1, 31))
  kind = 'split_single_tower' if n_towers == 1 else 'shuffled_labels'
  bimodality = stats.bimodality(pref)
  loss = np.asarray(item_loss_V, np.float64)[keep]
  boot = (clusters.bootstrap_scores(res['doc_sums'], items, res['weights_VxN'][items],
                                    int(a.n_boot), int(a.seed))
          if 'doc_sums' in res and items.size else None)
  ctx = {'a': a, 'cov_CxI': np.stack([np.log(count), loss]), 'boot_BxI': boot,
         'pref_norm': res['pref_norm'][keep], 'two_towers': n_towers <= 2, 'ctrl_KxI': ctrl_KxI}
  wc = np.asarray(classes['word_class'])[keep]
  out = {
      'n_items': int(keep.sum()),
      'n_positions': int(res['count'].sum()),
      'prefer': prefer_test(pref, ctrl_KxI),
      'bimodality': bimodality,
      'control': {'kind': kind, 'bimodality': stats.bimodality(ctrl),
                  'null': stats.null_test(bimodality, _bimodality_all(ctrl_KxI))},
      'histogram': {'edges': edges.tolist(), 'counts': np.histogram(pref, edges)[0].tolist(),
                    'control_counts': np.histogram(ctrl[np.isfinite(ctrl)], edges)[0].tolist()},
      'frequency': frequency_stats(pref, count, wc == 'closed', wc == 'open', a.n_boot, a.seed),
      'class_enrichment': dict(class_block(pref, wc == 'closed', wc == 'open', ctx),
                               source=classes['source']),
      'punct': dict(class_block(pref, wc == 'punct', wc == 'open', ctx, 1),
                    source=classes['source']),
      'n_fragments': int(np.sum(wc == 'fragment')),
      'top_items': top_items(res, pieces, keep, n_towers),
      'seconds': float(res['seconds'] + res['prepare_seconds']),
      'tokens_per_s': float(res['tokens_per_s']),
  }
  if 'doc_sums' in res:
    out['n_documents'] = clusters.summary(res['doc_sums'])['n_documents']
  if alt_classes is not None:
    alt = np.asarray(alt_classes['word_class'])[keep]
    out['class_sensitivity'] = {alt_classes['source']: dict(
        class_block(pref, alt == 'closed', alt == 'open', ctx, 2), source=alt_classes['source'])}
  if out['n_items'] < MIN_ITEMS:
    out['note'] = (f'only {out["n_items"]} item(s) reach `min_count` = {a.min_count}, too few '
                   'for these statistics (n/a); lower `analysis.min_count` or score more held-out '
                   'windows (`analysis.eval_windows`)')
  if planted_V is not None:  # how well the preference separates the planted classes
    pc = np.asarray(planted_V)[keep]
    out['planted'] = class_block(pref, pc == planted.SYNTAX, pc == planted.TOPIC, ctx, 3)
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
