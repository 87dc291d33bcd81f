"""What the points of an experiment show together: DIR/results.json (then results.md, figures).

Reads only the points' files (config.json aside): metrics.jsonl (eval loss and its plateau),
analysis/summary.json (each run's own tests), analysis/preference.csv (the items, for the
cross-fitted class effect and the cross-seed stability) and analysis/over_training.json.
Per group (a value of the experiment's group_by axis, e.g. a tower type) and estimator: the
class test pooled over the other axes' points (pooling.py), how many of them show a split
on their own, the stability of the per-item preference between them, the one-tower control
beside them and the class test over training. Deterministic: the same points give the same
results.json whether they ran in one command or as separate jobs (times are kept apart, in
each point's experiment_point.json).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from twotower_jax import preference_table
from twotower_jax import workdir as workdir_lib
from twotower_jax.experiment import pooling
from twotower_jax.experiment import runner
from twotower_jax.experiment import spec as spec_lib
from twotower_jax.experiment import writeup as writeup_lib

RESULTS_JSON = 'results.json'
CLASSES = ('closed', 'open')  # the class test pooled here: function vs content words


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def eval_curve(workdir: str) -> list[list[float]]:
  """[[step, eval loss], ...] of a run's metrics.jsonl (a resumed run's repeated steps: the
  last line)."""
  by_step = {int(m['step']): float(m['loss']) for m in workdir_lib.read_metrics(workdir)
             if m.get('kind') == 'eval' and 'step' in m and _finite(m.get('loss'))}
  return [[s, by_step[s]] for s in sorted(by_step)]


def plateau(curve: list[list[float]], steps: int, tolerance: float) -> dict[str, Any]:
  """How far a run's eval loss still moved in its last quarter: the relative fall from the
  last eval at or before 3/4 of the steps to the final one; levelled off below `tolerance`."""
  nan = float('nan')
  final = curve[-1] if curve else [None, nan]
  earlier = [c for c in curve if c[0] <= 0.75 * steps and c[0] < final[0]]
  if not earlier:
    return {'final_step': final[0], 'final_loss': final[1], 'reference_step': None,
            'last_quarter_change': nan, 'levelled_off': None}
  ref = earlier[-1]
  change = (ref[1] - final[1]) / final[1]
  return {'final_step': final[0], 'final_loss': final[1], 'reference_step': ref[0],
          'reference_loss': ref[1], 'last_quarter_change': change,
          'levelled_off': bool(change < tolerance)}


def class_items(cols: dict[str, Any], est: str, min_count: int) -> dict[str, Any]:
  """The class test's items of one estimator in preference.csv: scored at least min_count
  times, a finite preference and item loss, function (positive) or content words."""
  count, pref = cols['count'], cols[f'{est}_pref']
  loss = cols.get('item_loss', np.full(count.shape, np.nan))
  wc = np.asarray(cols['word_class'])
  keep = ((count >= min_count) & np.isfinite(pref) & np.isfinite(loss) & (count > 0)
          & np.isin(wc, CLASSES))
  idx = np.flatnonzero(keep)
  return {'pieces': [cols['piece'][i] for i in idx], 'pref': pref[idx],
          'labels': wc[idx] == CLASSES[0], 'cov': np.stack([np.log(count[idx]), loss[idx]])}


def _scored(cols: dict[str, Any], est: str, min_count: int) -> dict[str, float]:
  """piece -> preference of every item scored at least min_count times (for stability)."""
  count, pref = cols['count'], cols[f'{est}_pref']
  return {p: float(pref[i]) for i, p in enumerate(cols['piece'])
          if count[i] >= min_count and np.isfinite(pref[i])}


def _estimator_record(ps: dict[str, Any], cols, est, a, exp, alpha) -> dict[str, Any]:
  ce = ps.get('class_enrichment') or {}
  items = class_items(cols, est, int(a.min_count))
  cross = pooling.crossfit_effect(items['pref'], items['labels'], items['cov'],
                                  pooling.item_halves(items['pieces']),
                                  n_bins=int(a.strata_bins), n_boot=int(exp.n_boot),
                                  seed=int(exp.seed))
  p = ce.get('p', float('nan'))
  return {'n_items': ps.get('n_items'),
          'prefer_p': ((ps.get('prefer') or {}).get('null') or {}).get('p'),
          'class': {'auc': ce.get('auc'), 'ci': ce.get('ci'), 'p': p,
                    'auc_unadjusted': ce.get('auc_unadjusted'),
                    'direction': (ce.get('test') or {}).get('direction', ''),
                    'n_positive': ce.get('n_positive'), 'n_negative': ce.get('n_negative'),
                    'split': bool(_finite(p) and p < alpha), 'source': ce.get('source')},
          'crossfit': cross}


def point_record(point: spec_lib.Point, root: str, exp) -> tuple[dict[str, Any], dict]:
  """(results.json's record of a point, its scored items per estimator for stability)."""
  wd = runner.point_dir(root, point)
  a = point.config.analysis
  adir = workdir_lib.analysis_dir(wd)
  summary = workdir_lib.read_json(os.path.join(adir, workdir_lib.SUMMARY_JSON))
  cols = preference_table.read_preferences(os.path.join(adir, workdir_lib.PREFERENCE_CSV))
  mark = workdir_lib.read_json(os.path.join(wd, runner.POINT_MARK))
  primary = next((t for t in (summary.get('tests') or {}).get('family', []) if t['primary']),
                 None)
  per_est, scored = {}, {}
  for est in summary.get('estimators', []):
    if f'{est}_pref' not in cols:
      continue
    per_est[est] = _estimator_record(summary['per_estimator'][est], cols, est, a, exp,
                                     float(a.alpha))
    scored[est] = _scored(cols, est, int(a.min_count))
  over = workdir_lib.read_optional_json(os.path.join(adir, workdir_lib.OVER_TRAINING_JSON))
  curve = eval_curve(wd)
  record = {
      'name': point.name, 'kind': point.kind, 'group': point.group, 'values': point.values,
      'n_towers': int(point.config.model.n_towers), 'steps': int(point.config.train.steps),
      'commit': mark.get('commit'), 'eval_curve': curve,
      'plateau': plateau(curve, int(point.config.train.steps), float(exp.plateau_tolerance)),
      'analysis': {'step': summary.get('step'), 'eval_loss_scored': summary.get('eval_loss'),
                   'n_positions': summary.get('n_positions'),
                   'word_class_source': summary.get('word_class_source'),
                   'primary': None if primary is None else {
                       'name': primary['name'], 'p': primary['p'],
                       'significant': primary['significant']},
                   'estimators': per_est},
      'over_training': [{'step': r['step'], 'eval_loss': r.get('eval_loss'),
                         'per_estimator': {e: {'class_auc': v.get('class_auc'),
                                               'class_p': v.get('class_p')}
                                           for e, v in r['per_estimator'].items()}}
                        for r in (over or {}).get('steps', [])],
  }
  return record, scored


def _over_training(records: list[dict[str, Any]], est: str) -> list[dict[str, Any]]:
  """Per step over the group's points: the adjusted class AUC oriented by each point's final
  direction (0.5 + sign(final AUC - 0.5) (AUC - 0.5)) and the class test p, averaged."""
  rows: dict[int, list[tuple[float, float]]] = {}
  for r in records:
    final = r['analysis']['estimators'].get(est, {}).get('class', {}).get('auc')
    if not _finite(final):
      continue
    sign = 1.0 if final >= 0.5 else -1.0
    for row in r['over_training']:
      v = row['per_estimator'].get(est) or {}
      if _finite(v.get('class_auc')):
        rows.setdefault(int(row['step']), []).append(
            (0.5 + sign * (v['class_auc'] - 0.5), v.get('class_p', float('nan'))))
  return [{'step': s, 'n_points': len(v), 'oriented_auc': float(np.mean([x for x, _ in v])),
           'class_p': float(np.nanmean([p for _, p in v])) if any(map(_finite, [p for _, p in v]))
           else float('nan')} for s, v in sorted(rows.items())]


def _stability(scored: list[dict[str, float]], names: list[str], n_towers: int, exp
               ) -> dict[str, Any]:
  common = sorted(set.intersection(*(set(s) for s in scored))) if scored else []
  if len(scored) < 2 or len(common) < 4:
    return {'n_items': len(common), 'pairs': [], 'mean': float('nan'),
            'ci': [float('nan')] * 2, 'note': 'fewer than two points or four shared items'}
  prefs = np.array([[s[p] for p in common] for s in scored])
  return pooling.stability(prefs, pooling.item_halves(common), align=n_towers == 2,
                           n_boot=int(exp.n_boot), seed=int(exp.seed), names=names)


def group_record(group: str, records: list[dict[str, Any]], scored: list[dict], exp,
                 alpha: float) -> dict[str, Any]:
  """One group's answer per estimator (module docstring)."""
  runs = [(r, s) for r, s in zip(records, scored) if r['kind'] != spec_lib.CONTROL]
  control = next((r for r in records if r['kind'] == spec_lib.CONTROL), None)
  ests = sorted({e for r, _ in runs for e in r['analysis']['estimators']})
  out = {'points': [r['name'] for r, _ in runs], 'control': control and control['name'],
         'levelled_off': [r['name'] for r, _ in runs if r['plateau']['levelled_off']],
         'estimators': {}}
  for est in ests:
    have = [(r, s[est]) for r, s in runs if est in r['analysis']['estimators']]
    blocks = [r['analysis']['estimators'][est] for r, _ in have]
    cross = [b['crossfit'] for b in blocks]
    pooled = pooling.random_effects([c['effect'] for c in cross],
                                    [c['se'] ** 2 for c in cross])
    primary = [r['analysis']['primary'] for r, _ in have]
    ctrl = control and control['analysis']['estimators'].get(est)
    out['estimators'][est] = {
        'pooled': dict(pooled, points=[r['name'] for r, _ in have]),
        'seeds_with_split': {'n': sum(b['class']['split'] for b in blocks), 'of': len(blocks),
                             'alpha': alpha,
                             'points': [r['name'] for (r, _), b in zip(have, blocks)
                                        if b['class']['split']]},
        'primary_significant': {'n': sum(bool(p and p['significant']) for p in primary),
                                'of': sum(p is not None for p in primary),
                                'test': next((p['name'] for p in primary if p), None)},
        'stability': _stability([s for _, s in have], [r['name'] for r, _ in have],
                                have[0][0]['n_towers'], exp),
        'control': None if not ctrl else {'point': control['name'], 'prefer_p': ctrl['prefer_p'],
                                          'class': ctrl['class'], 'crossfit': ctrl['crossfit']},
        'over_training': _over_training([r for r, _ in have], est),
    }
  return out


def aggregate(exp, points: list[spec_lib.Point], root: str, provenance: dict[str, Any]
              ) -> dict[str, Any]:
  """results.json's content from the finished points (the caller checked they are)."""
  records, scored = zip(*(point_record(p, root, exp) for p in points))
  alpha = float(points[0].config.analysis.alpha)
  groups = {}
  for g in dict.fromkeys(p.group for p in points):  # in the points' order
    idx = [i for i, p in enumerate(points) if p.group == g]
    groups[g] = group_record(g, [records[i] for i in idx], [scored[i] for i in idx], exp, alpha)
  a = points[0].config.analysis
  return workdir_lib.clean({
      'experiment': exp.name, **provenance,
      'settings': {'group_by': spec_lib.axes(exp)[0][0], 'alpha': alpha,
                   'primary': a.primary, 'min_count': int(a.min_count),
                   'strata_bins': int(a.strata_bins), 'n_boot': int(exp.n_boot),
                   'seed': int(exp.seed), 'plateau_tolerance': float(exp.plateau_tolerance),
                   'over_training': bool(exp.over_training), 'classes': list(CLASSES),
                   'halves': 'low bit of the first byte of sha256(piece)'},
      'groups': groups, 'points': list(records)})


def writeup(root: str, results: dict[str, Any]) -> dict[str, Any]:
  """results.md and the figures (writeup.py)."""
  return writeup_lib.write(root, results)


def write(root: str, results: dict[str, Any]) -> str:
  path = os.path.join(root, RESULTS_JSON)
  workdir_lib.write_json(path, results, indent=1)
  return path
