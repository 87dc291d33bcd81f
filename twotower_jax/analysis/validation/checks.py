"""The validation's verdicts: the ladder's split rises with w and vanishes at w = 0.5; the
nulls' false-positive rates stay at most max_fpr.

Per estimator, from each composed model's summary.json (`per_estimator.EST.planted`: the
planted class test, syntax items positive). The ladder's statistic is the **split
strength** L = min(share of syntax items leaning to tower 0, share of topic items leaning to
tower 1): how far the weaker class goes to its own tower, which is what the class test's
two leans test (the association's adjusted AUC is reported beside it; it also rises when
one source is simply better at one class, as two seeds can be). Its 95% interval joins the
two shares' Clopper-Pearson intervals.
- ladder, `gate` (towers frozen, so the sources' split is the model's): (1) no rung's L lies
  above a higher rung's with disjoint intervals (it rises with w within its intervals); (2)
  the top rung's interval lies above the w = 0.5 rung's; (3) the w = 0.5 rung reports no
  split (class test p >= alpha).
- ladder, `joint` (the concat gate and the towers trained together): (1) as above, and (2)
  every rung with w > 0.5 has L's interval above 0.5. Joint training can itself divide the
  labour between two towers (the effect the project studies), so w = 0.5 is reported, not
  checked.
- the SentencePiece rung: L's interval lies above 0.5.
- nulls: the share of replicates whose class test rejects at alpha (the false-positive
  rate, with its Clopper-Pearson interval) is at most max_fpr, for the seeds null, the
  quality null and the shuffled-tower draws.

Required are the checks of the primary estimator (the estimator of `analysis.primary`, the
test a report's headline claim rests on, fixed before the data); every other estimator's
checks are reported beside them as secondary: a secondary failure says that estimator's
class test is not calibrated on that null, and the report says so, but it does not fail the
validation (`required`, `mark_required`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twotower_jax.analysis import stats

NULLS = ('seeds', 'quality', 'shuffled')


def _finite(x) -> bool:
  return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def planted_block(summary: dict[str, Any], est: str) -> dict[str, Any] | None:
  return ((summary.get('per_estimator') or {}).get(est) or {}).get('planted')


def split_strength(block: dict[str, Any]) -> tuple[float, list[float]]:
  """(L, 95% interval): the smaller of the share of positive-class items leaning to tower 0
  and the share of negative-class items leaning to tower 1 (a class test block)."""
  test = block.get('test') or {}
  legs = []
  for key, share in (('lean_positive', 'share_positive'), ('lean_negative', 'share_negative')):
    lean = test.get(key) or {}
    n, x = lean.get('n') or 0, lean.get(share)
    if x is None and share == 'share_negative' and _finite(lean.get('share_positive')):
      x = 1.0 - lean['share_positive']  # summaries written before share_negative existed
    if not n or not _finite(x):
      return float('nan'), [float('nan'), float('nan')]
    legs.append((x, stats.binomial_ci(int(round(x * n)), int(n))))
  return (min(x for x, _ in legs), [min(c[0] for _, c in legs), min(c[1] for _, c in legs)])


def rung_row(w: float, block: dict[str, Any] | None, alpha: float) -> dict[str, Any]:
  if not block:
    return {'w': w, 'strength': None, 'strength_ci': [None, None], 'auc': None,
            'ci': [None, None], 'p': None, 'split': None}
  p = block.get('p')
  strength, strength_ci = split_strength(block)
  return {'w': w, 'strength': strength, 'strength_ci': strength_ci, 'auc': block.get('auc'),
          'ci': block.get('ci'), 'p': p, 'auc_unadjusted': block.get('auc_unadjusted'),
          'split': bool(_finite(p) and p < alpha), 'direction': (block.get('test') or {}).get(
              'direction')}


def judge_ladder(name: str, rows: list[dict[str, Any]], alpha: float,
                 mode: str = 'gate') -> dict[str, Any]:
  """The module docstring's ladder checks on one estimator's rungs (any order)."""
  rows = sorted(rows, key=lambda r: -r['w'])
  missing = [r['w'] for r in rows
             if not (_finite(r['strength']) and all(map(_finite, r['strength_ci'])))]
  if missing:
    return {'name': name, 'passed': False, 'rungs': rows,
            'why': f'no split strength or interval at w = {missing}'}
  if len(rows) == 1:  # the SentencePiece rung
    lo = rows[0]['strength_ci'][0]
    ok = lo > 0.5
    return {'name': name, 'passed': ok, 'rungs': rows,
            'why': f'split strength interval from {lo:.3f}: {"above" if ok else "not above"} 0.5'}
  why = []
  for hi, lo in zip(rows, rows[1:]):
    if hi['strength_ci'][1] < lo['strength_ci'][0]:
      why.append(f'falls from w={lo["w"]:g} to w={hi["w"]:g} beyond the intervals')
  if mode == 'joint':
    weak = [r['w'] for r in rows if r['w'] > 0.5 and not r['strength_ci'][0] > 0.5]
    if weak:
      why.append(f'no split beyond 0.5 at w = {weak}')
  else:
    top, bottom = rows[0], rows[-1]
    if not top['strength_ci'][0] > bottom['strength_ci'][1]:
      why.append(f'w={top["w"]:g} interval {top["strength_ci"][0]:.3f}.. does not lie above '
                 f'w={bottom["w"]:g}\'s ..{bottom["strength_ci"][1]:.3f}')
    if bottom['w'] == 0.5 and bottom['split']:
      why.append(f'reports a split at w=0.5 (p={bottom["p"]:.4f} < {alpha})')
  ok_text = ('rises with w; no split at w=0.5' if mode != 'joint' else
             'rises with w; a split at every w > 0.5')
  return {'name': name, 'passed': not why, 'rungs': rows, 'why': '; '.join(why) or ok_text}


def judge_null(name: str, p_values: list[float], alpha: float, max_fpr: float
               ) -> dict[str, Any]:
  """The false-positive rate of a test over replicates of a null."""
  ps = [p for p in p_values if _finite(p)]
  k = int(np.sum(np.asarray(ps) < alpha)) if ps else 0
  rate = k / len(ps) if ps else float('nan')
  ok = bool(ps) and rate <= max_fpr
  return {'name': name, 'passed': ok, 'n': len(ps), 'rejections': k, 'fpr': rate,
          'fpr_ci': stats.binomial_ci(k, len(ps)), 'p_values': ps,
          'why': (f'{k}/{len(ps)} rejections at alpha {alpha}: rate {rate:.3f} '
                  f'{"<=" if ok else ">"} {max_fpr}') if ps else 'no replicate analysed'}


def mark_required(checks: list[dict[str, Any]], primary_estimator: str
                  ) -> list[dict[str, Any]]:
  """Each check with `required`: True for the primary estimator's (the name's last part)."""
  return [dict(c, required=c['name'].rsplit('/', 1)[-1] == primary_estimator) for c in checks]


def ladder_checks(results: list[dict[str, Any]], estimators: list[str], alpha: float
                  ) -> list[dict[str, Any]]:
  """One check per (ladder, composition, estimator that ran)."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in results:
    g = r['group']
    if g['kind'] == 'ladder' and 'mode' in g:
      key = ('pieces' if g['tokens'] == 'pieces' else g['tower_type'], g['mode'])
      groups.setdefault(key, []).append(r)
  out = []
  for (ladder, mode), members in groups.items():
    for est in estimators:
      blocks = [(m['group']['w'], planted_block(m['summary'], est)) for m in members]
      if all(b is None for _, b in blocks):
        continue  # the estimator does not apply to this composition (e.g. gate on concat)
      out.append(judge_ladder(f'ladder/{ladder}/{mode}/{est}',
                              [rung_row(w, b, alpha) for w, b in blocks], alpha, mode))
  return out


def null_checks(results: list[dict[str, Any]], estimators: list[str], alpha: float,
                max_fpr: float) -> list[dict[str, Any]]:
  """One check per (null, estimator): seeds, quality (one p per replicate) and shuffled
  (the class test on shuffled-tower draws of every null model)."""
  out = []
  nulls = [r for r in results if r['group']['kind'] == 'null' and 'null' in r['group']]
  if not nulls:
    return out
  for est in estimators:
    for null in NULLS:
      if null == 'shuffled':
        ps = [p for r in nulls for p in (planted_block(r['summary'], est) or {}).get(
            'control_p', [])]
      else:
        ps = [(planted_block(r['summary'], est) or {}).get('p') for r in nulls
              if r['group']['null'] == null]
        ps = [p for p in ps if p is not None]
      if ps:
        out.append(judge_null(f'null/{null}/{est}', ps, alpha, max_fpr))
  return out
