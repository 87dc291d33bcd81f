"""Stability across runs: align exchangeable towers, then correlate preferences.

Towers have no identity across runs (tower 0 of one seed may play the role of
tower 1 of another), so before comparing, each run's towers are permuted to
agree best with the first run's. Reads DIR/analysis/preference.csv of every run
(through workdir.py, which owns its columns), writes OUT/compare.json and OUT/compare.md
together (a staged folder renamed into place).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

from twotower_jax import errors
from twotower_jax import paths
from twotower_jax import staging
from twotower_jax import preference_table
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import stats

MAX_TOWERS_TO_PERMUTE = 8  # 8! = 40320 permutations: still instant


class CompareError(errors.UserError):
  """Runs that cannot be compared; the message says which and why."""


def read_preferences(workdir: str) -> dict[str, Any]:
  """{'pieces': [I], 'count': [I], 'towers': {est: [I, N]}, 'pref': {est: [I]}} of a run."""
  if not paths.isdir(workdir):
    what = 'is a file, not a run directory' if paths.exists(workdir) else 'does not exist'
    raise CompareError(f'--compare: {workdir} {what}; give the workdirs of analysed runs')
  file = paths.join(workdir_lib.analysis_dir(workdir), workdir_lib.PREFERENCE_CSV)
  cols = preference_table.read_preferences(file)
  ests = cols['_estimators']
  summary = workdir_lib.read_optional_json(
      paths.join(workdir_lib.analysis_dir(workdir), workdir_lib.SUMMARY_JSON)) or {}
  if not ests or summary.get('n_towers') == 1:  # one tower: only the split-unit control
    why = (f'{workdir} is a one-tower run' if summary.get('n_towers') == 1 else
           f'{file} has no estimator columns')
    raise CompareError(f'--compare: {why}, so it has no tower preference to compare; compare '
                       'runs of two or more towers')
  vocab = _vocab_size(workdir)
  if vocab is not None and len(cols['piece']) != vocab:
    raise CompareError(f'{file} has {len(cols["piece"])} rows but the run has data.vocab_size='
                       f'{vocab} (a truncated copy?); rerun the analysis of {workdir}')
  return {'pieces': cols['piece'], 'count': cols['count'],
          'towers': {est: preference_table.tower_values(cols, est) for est in ests},
          'pref': {est: cols[f'{est}_pref'] for est in ests}}


def _vocab_size(workdir: str) -> int | None:
  """data.vocab_size from the run's config.json (None when the folder has none)."""
  if not paths.exists(workdir_lib.path(workdir, workdir_lib.CONFIG_JSON)):
    return None
  return int(workdir_lib.read_config(workdir).data.vocab_size)


def check_runs(workdirs: list[str], out_dir: str, given: bool = True) -> None:
  """CompareError before any reading: fewer than two runs, a run given twice (the trivial
  agreement 1 of a run with itself), or an output folder staging.refusal refuses."""
  if len(workdirs) < 2:
    raise CompareError('--compare needs at least two workdirs')
  seen = {}
  for d in workdirs:
    real = paths.absolute(d) if paths.is_remote(d) else os.path.realpath(d)
    if real in seen:
      same = f' ({seen[real]} and {d} are one folder)' if seen[real] != d else ''
      raise CompareError(f'--compare names {real} twice{same}; a run agrees with itself '
                         'trivially (1.000): give different runs, e.g. other seeds')
    seen[real] = d
  why = staging.refusal(out_dir, 'comparison', (workdir_lib.COMPARE_JSON,) if given else None,
                        reads=workdirs)
  if why:
    raise CompareError(why)


def _centred(values_IxN: np.ndarray) -> np.ndarray:
  """Per item, each tower's value minus the item's mean over towers.

  Removes what all towers share (an item's overall difficulty), leaving the part
  that says which tower is better. For two towers this is +-pref/2.
  """
  return values_IxN - values_IxN.mean(axis=1, keepdims=True)


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
  keep = np.ones(arrays[0].shape[0], bool)
  for a in arrays:
    keep &= np.all(np.isfinite(a.reshape(a.shape[0], -1)), axis=1)
  return keep


def best_permutation(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]
                     ) -> tuple[tuple[int, ...], float, dict[str, float]]:
  """The tower permutation of `other` that maximises agreement with `ref`.

  Agreement of a permutation p: over the estimators both runs have, the mean
  Spearman correlation between ref's centred tower-k values and other's centred
  tower-p[k] values, averaged over towers. Returns (p, agreement, agreement per
  permutation as 'p0,p1,...' -> value).
  """
  ests = sorted(set(ref) & set(other))
  if not ests:
    raise CompareError('the runs share no estimator columns; run analyze with the same '
                       '--config.analysis estimators on every run')
  n = ref[ests[0]].shape[1]
  if any(ref[e].shape[1] != n or other[e].shape[1] != n for e in ests):
    raise CompareError('the runs have different numbers of towers; compare runs of one model')
  if n > MAX_TOWERS_TO_PERMUTE:
    raise CompareError(f'{n} towers: too many to try every permutation (max '
                       f'{MAX_TOWERS_TO_PERMUTE})')
  scores = {}
  for perm in itertools.permutations(range(n)):
    per_est = []
    for e in ests:
      a, b = _centred(ref[e]), _centred(other[e][:, list(perm)])
      keep = _finite_rows(a, b)
      per_est.append(np.nanmean([stats.spearman(a[keep, k], b[keep, k]) for k in range(n)]))
    scores[perm] = float(np.nanmean(per_est)) if np.any(np.isfinite(per_est)) else -np.inf
  best = max(scores, key=lambda p: (scores[p], tuple(-i for i in p)))  # ties: identity first
  return best, scores[best], {','.join(map(str, p)): v for p, v in scores.items()}


def aligned_preference(run: dict[str, Any], est: str, perm: tuple[int, ...]) -> np.ndarray:
  """Items' preference in the reference run's tower order: [I] for 2 towers, else [I*N].

  Two towers: the run's `{est}_pref` column, negated when the towers are swapped.
  More towers: the centred per-tower values, permuted and flattened item-major.
  """
  values = run['towers'][est]
  if values.shape[1] == 2:
    pref = run['pref'][est]
    return pref if perm == (0, 1) else -pref
  return _centred(values[:, list(perm)]).reshape(-1)


def _fmt(x: float) -> str:
  return 'n/a' if x is None or not math.isfinite(x) else f'{x:.3f}'


def run_compare(workdirs: list[str], out_dir: str, min_count: int = 20, n_boot: int = 1000,
                seed: int = 0, given: bool = True) -> dict[str, Any]:
  """Aligns every run's towers to the first run's and correlates their preferences.

  Items: pieces present in every run with count >= min_count in each. For each
  pair of runs and each shared estimator: Spearman and Pearson of the aligned
  preferences with bootstrap CIs over items. OUT (`out_dir`, `given` by --out or the
  default DIR1/analysis/compare) is replaced whole: compare.json and compare.md together.
  """
  check_runs(workdirs, out_dir, given)
  runs = [read_preferences(d) for d in workdirs]
  common = set(runs[0]['pieces'])
  for r in runs[1:]:
    common &= set(r['pieces'])
  index = [{p: i for i, p in enumerate(r['pieces'])} for r in runs]
  items = sorted(p for p in common
                 if all(r['count'][idx[p]] >= min_count for r, idx in zip(runs, index)))
  if len(items) < 3:
    raise CompareError(f'only {len(items)} items have count >= {min_count} in every run; '
                       'lower the minimum count or analyze more eval tokens')
  ests = sorted(set.intersection(*(set(r['towers']) for r in runs)))
  sub = []
  for r, idx in zip(runs, index):
    rows = np.array([idx[p] for p in items])
    sub.append({'towers': {e: r['towers'][e][rows] for e in ests},
                'pref': {e: r['pref'][e][rows] for e in ests}})

  alignment = [{'workdir': workdirs[0], 'permutation': list(range(sub[0]['towers'][ests[0]].shape[1])
                                                          ) if ests else [], 'agreement': 1.0}]
  perms = [tuple(alignment[0]['permutation'])]
  for d, s in zip(workdirs[1:], sub[1:]):
    perm, agreement, table = best_permutation(sub[0]['towers'], s['towers'])
    perms.append(perm)
    alignment.append({'workdir': d, 'permutation': list(perm), 'agreement': agreement,
                      'agreement_by_permutation': table})

  pairs = []
  for i, j in itertools.combinations(range(len(runs)), 2):
    for e in ests:
      a = aligned_preference(sub[i], e, perms[i])
      b = aligned_preference(sub[j], e, perms[j])
      keep = np.isfinite(a) & np.isfinite(b)
      a, b = a[keep], b[keep]
      row = {'run_a': workdirs[i], 'run_b': workdirs[j], 'estimator': e, 'n': int(a.size)}
      for name, fn in (('spearman', stats.spearman), ('pearson', stats.pearson)):
        row[name] = fn(a, b)
        row[name + '_ci'] = list(stats.bootstrap_ci(fn, (a, b), n_boot=n_boot, seed=seed))
      pairs.append(row)

  result = {'workdirs': list(workdirs), 'min_count': min_count, 'n_items': len(items),
            'estimators': ests, 'n_boot': n_boot, 'alignment': alignment, 'pairs': pairs}
  try:
    with staging.staged_dir(out_dir) as staged:
      workdir_lib.write_json(paths.join(staged, workdir_lib.COMPARE_JSON),
                             workdir_lib.strict_json(result), indent=2)
      workdir_lib.write_text(paths.join(staged, workdir_lib.COMPARE_MD), _markdown(result))
  except OSError as e:
    raise CompareError(f'cannot write the comparison to {paths.absolute(out_dir)} '
                       f'({e.strerror}); free space or pass --out=DIR, a writable folder') from None
  return result


def _markdown(result: dict[str, Any]) -> str:
  lines = ['# Stability of tower preference across runs', '',
           f'{result["n_items"]} vocabulary items seen at least {result["min_count"]} times in '
           f'every run. Towers are exchangeable, so each run\'s towers were permuted to agree '
           f'best with run 0 (mean Spearman of the per-item tower advantages).', '',
           '| run | workdir | tower order (as run 0) | agreement |', '|---|---|---|---|']
  for i, a in enumerate(result['alignment']):
    lines.append(f'| {i} | `{a["workdir"]}` | {a["permutation"]} | {_fmt(a["agreement"])} |')
  lines += ['', 'Correlation of aligned preferences; 95% bootstrap intervals over items '
            f'({result["n_boot"]} resamples). The permutation was chosen on the same data, '
            'so the intervals do not include that choice.', '',
            '| run a | run b | estimator | items | Spearman [95% CI] | Pearson [95% CI] |',
            '|---|---|---|---|---|---|']
  run_id = {d: i for i, d in enumerate(result['workdirs'])}
  for p in result['pairs']:
    cells = [f'{_fmt(p[k])} [{_fmt(p[k + "_ci"][0])}, {_fmt(p[k + "_ci"][1])}]'
             for k in ('spearman', 'pearson')]
    lines.append(f'| {run_id[p["run_a"]]} | {run_id[p["run_b"]]} | {p["estimator"]} | {p["n"]} | '
                 f'{cells[0]} | {cells[1]} |')
  return '\n'.join(lines) + '\n'
