"""The report's family of tests: one primary test fixed in the config, Holm for the rest.

Every test the report states is collected here with its p-value. The primary test
(`analysis.primary`, 'ESTIMATOR/TEST', chosen before the data is seen) is judged at
`analysis.alpha` on its own; every other test's p-value is Holm-adjusted over the others
(stats.holm), so the report's yes/no claims together keep a family-wise error of alpha.
"""

from __future__ import annotations

import math
from typing import Any

from twotower_jax.analysis import stats

# test name -> (what a rejection says, where its p-value is in an estimator's summary block)
TESTS = {
    'prefer': ('some items prefer a tower (vs towers shuffled at every occurrence)',
               ('prefer', 'null', 'p')),
    'bimodality': ('the preferences are more bimodal than with shuffled towers',
                   ('control', 'null', 'p')),
    'class': ('function and content words lean to different towers, beyond frequency and '
              'item loss', ('class_enrichment', 'p')),
    'punct': ('punctuation and content words lean to different towers, beyond frequency and '
              'item loss', ('punct', 'p')),
    'planted': ('planted syntax and topic items lean to different towers, beyond frequency '
                'and item loss', ('planted', 'p')),
}
SENSITIVITY = 'class@'  # class test under a second word-class source: 'class@function_words'


def parse_primary(primary: str) -> tuple[str, str]:
  """('estimator', 'test') of an analysis.primary value (format checked by check_config)."""
  est, _, test = primary.partition('/')
  return est.strip(), test.strip()


def _get(block: Any, path: tuple[str, ...]) -> float:
  for key in path:
    if not isinstance(block, dict):
      return float('nan')
    block = block.get(key)
  try:
    return float(block)
  except (TypeError, ValueError):
    return float('nan')


def family(per_estimator: dict[str, Any], primary: str, alpha: float) -> dict[str, Any]:
  """summary.json's `tests`: every test with its p, the primary's verdict and Holm-adjusted p
  for the others (`p_adjusted`); `significant` is p (primary) or p_adjusted (others) < alpha."""
  rows = {}
  for est, ps in per_estimator.items():
    for test, (what, path) in TESTS.items():
      p = _get(ps, path)
      if math.isfinite(p) or (test in ('class', 'prefer') and path[0] in ps):
        rows[f'{est}/{test}'] = {'estimator': est, 'test': test, 'what': what, 'p': p}
    for source, block in (ps.get('class_sensitivity') or {}).items():
      rows[f'{est}/{SENSITIVITY}{source}'] = {
          'estimator': est, 'test': SENSITIVITY + source, 'p': _get(block, ('p',)),
          'what': f'{TESTS["class"][0]}, word classes from {source}'}
  note = ''
  if primary not in rows:
    note = (f'the primary test {primary} was not computed for this run (its estimator did not '
            'run or has no such test); every test is Holm-adjusted')
  elif not math.isfinite(rows[primary]['p']):
    note = f'the primary test {primary} is undefined here (too few items of a class)'
  adjusted = stats.holm({k: r['p'] for k, r in rows.items() if k != primary})
  for name, r in rows.items():
    r['primary'] = name == primary
    r['p_adjusted'] = r['p'] if r['primary'] else adjusted[name]
    r['significant'] = bool(math.isfinite(r['p_adjusted']) and r['p_adjusted'] < alpha)
  return {'alpha': float(alpha), 'primary': primary, 'primary_note': note,
          'family': [dict(name=k, **r) for k, r in rows.items()]}
