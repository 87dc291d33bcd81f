"""Cross-run comparison: tower alignment and correlations from fake preference.csv files."""

import json
import os
import re

import numpy as np
import pytest

from twotower_jax import preference_table
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import compare
from twotower_jax.analysis.estimators import base as est_base
from twotower_jax import errors


def write_run(workdir, pieces, counts, est_values):
  """est_values: {est: [I, N]} -> DIR/analysis/preference.csv, written by the analysis's writer."""
  os.makedirs(os.path.join(workdir, 'analysis'), exist_ok=True)
  results = {}
  for est, v_IxN in est_values.items():
    pref, best, _ = est_base.preference(v_IxN.T)
    results[est] = {'count': np.asarray(counts, float), 'mean_NxV': v_IxN.T, 'pref': pref,
                    'best': best, 'pref_lo': pref - 0.1, 'pref_hi': pref + 0.1}
  classes = {'word_class': [''] * len(pieces), 'upos': [''] * len(pieces)}
  preference_table.write_preference_csv(os.path.join(workdir, 'analysis', 'preference.csv'), pieces,
                                   classes, results)
  return str(workdir)


def fake_values(rng, n_items, n_towers, advantage):
  """Per-tower log-likelihoods: a shared item difficulty plus a tower advantage."""
  difficulty = rng.normal(-5, 2, size=(n_items, 1))
  return difficulty + advantage + 0.05 * rng.normal(size=(n_items, n_towers))


def test_two_runs_with_swapped_towers_align_by_sign(tmp_path):
  rng = np.random.default_rng(0)
  n = 120
  pieces = [f'p{i}' for i in range(n)] + ['"', ',', 'rare']
  counts = [50] * n + [40, 40, 3]
  adv = rng.normal(size=(n + 3, 1)) * np.array([[0.5, -0.5]])
  v1 = fake_values(rng, n + 3, 2, adv)
  v2 = fake_values(rng, n + 3, 2, adv)[:, ::-1]  # run 2: towers swapped
  g1 = rng.random((n + 3, 2))
  d1 = write_run(tmp_path / 'r1', pieces, counts, {'probe': v1, 'gate': g1})
  d2 = write_run(tmp_path / 'r2', pieces, counts, {'probe': v2})
  out = tmp_path / 'cmp'
  res = compare.run_compare([d1, d2], str(out), min_count=10, n_boot=200)
  assert res['estimators'] == ['probe']  # gate only in run 1
  assert res['n_items'] == n + 2  # 'rare' (count 3) dropped; quoted pieces kept
  assert res['alignment'][1]['permutation'] == [1, 0]
  (pair,) = res['pairs']
  assert pair['spearman'] > 0.98 and pair['pearson'] > 0.98
  assert pair['spearman_ci'][0] <= pair['spearman'] <= pair['spearman_ci'][1]
  assert pair['spearman_ci'][0] > 0.95
  saved = json.loads((out / 'compare.json').read_text())
  assert saved['alignment'][1]['permutation'] == [1, 0]
  assert '| 0 | 1 | probe |' in (out / 'compare.md').read_text()
  # Without alignment the correlation would be about -1: the sign flip matters.
  p1 = compare.read_preferences(d1)['pref']['probe'][:n]
  p2 = compare.read_preferences(d2)['pref']['probe'][:n]
  assert np.corrcoef(p1, p2)[0, 1] < -0.95


def test_identical_towers_order_kept(tmp_path):
  rng = np.random.default_rng(1)
  n = 60
  adv = rng.normal(size=(n, 1)) * np.array([[0.5, -0.5]])
  d1 = write_run(tmp_path / 'a', [f'x{i}' for i in range(n)], [30] * n,
                 {'probe': fake_values(rng, n, 2, adv)})
  d2 = write_run(tmp_path / 'b', [f'x{i}' for i in range(n)], [30] * n,
                 {'probe': fake_values(rng, n, 2, adv)})
  res = compare.run_compare([d1, d2], str(tmp_path / 'o'), n_boot=50)
  assert res['alignment'][1]['permutation'] == [0, 1]
  assert res['pairs'][0]['spearman'] > 0.95


def test_recovers_known_permutation_of_three_towers(tmp_path):
  rng = np.random.default_rng(2)
  n = 100
  adv = rng.normal(size=(n, 3))
  perm = [2, 0, 1]
  v1 = fake_values(rng, n, 3, adv)
  v2 = fake_values(rng, n, 3, adv)
  v2_shuffled = np.empty_like(v2)
  v2_shuffled[:, perm] = v2  # run 1's tower k lives in column perm[k] of run 2
  pieces = [f'w{i}' for i in range(n)]
  d1 = write_run(tmp_path / 'a', pieces, [25] * n, {'ablation': v1})
  d2 = write_run(tmp_path / 'b', pieces, [25] * n, {'ablation': v2_shuffled})
  d3 = write_run(tmp_path / 'c', pieces, [25] * n, {'ablation': fake_values(rng, n, 3, adv)})
  res = compare.run_compare([d1, d2, d3], str(tmp_path / 'o'), n_boot=50)
  assert res['alignment'][1]['permutation'] == perm
  assert res['alignment'][2]['permutation'] == [0, 1, 2]
  assert len(res['pairs']) == 3
  assert all(p['spearman'] > 0.95 for p in res['pairs'])


def test_missing_csv_is_a_user_error(tmp_path):
  d1 = write_run(tmp_path / 'a', ['x', 'y', 'z'], [30] * 3, {'probe': np.ones((3, 2))})
  (tmp_path / 'never_analyzed').mkdir()
  with pytest.raises(errors.UserError, match='run the analysis first'):
    compare.run_compare([d1, str(tmp_path / 'never_analyzed')], str(tmp_path / 'o'))
  with pytest.raises(errors.UserError, match='at least two'):
    compare.run_compare([d1], str(tmp_path / 'o'))


def test_extra_columns_are_not_estimators(tmp_path):
  """An estimator's extra columns (ablation_shapley_t0/t1) look like EST_tK columns but are
  not an estimator: compare counts one estimator, not two."""
  rng = np.random.default_rng(3)
  n = 50
  pieces = [f'w{i}' for i in range(n)]
  dirs = []
  for name in ('a', 'b'):
    v = rng.normal(size=(n, 2))
    pref, best, _ = est_base.preference(v.T)
    res = {'count': np.full(n, 30.0), 'mean_NxV': v.T, 'pref': pref, 'best': best,
           'pref_lo': pref, 'pref_hi': pref,
           'extras': {'shapley_t0': v[:, 0], 'shapley_t1': v[:, 1]}}
    os.makedirs(tmp_path / name / 'analysis')
    preference_table.write_preference_csv(str(tmp_path / name / 'analysis' / 'preference.csv'), pieces,
                                     {'word_class': [''] * n, 'upos': [''] * n}, {'ablation': res})
    dirs.append(str(tmp_path / name))
  header = (tmp_path / 'a' / 'analysis' / 'preference.csv').read_text().splitlines()[0]
  assert 'ablation_shapley_t0' in header
  res = compare.run_compare(dirs, str(tmp_path / 'o'), n_boot=20)
  assert res['estimators'] == ['ablation'] and len(res['pairs']) == 1


# --- round 3 (docs/RELIABILITY.md) ----------------------------------------------------------


def _two_runs(tmp_path, n=30):
  rng = np.random.default_rng(5)
  pieces = [f'w{i}' for i in range(n)]
  return [write_run(tmp_path / name, pieces, [30] * n, {'probe': rng.normal(size=(n, 2))})
          for name in ('a', 'b')]


def test_a_run_named_twice_is_refused(tmp_path):
  """A run agrees with itself trivially (it reported 1.000, 'run 1 vs run 1')."""
  a, b = _two_runs(tmp_path)
  os.symlink(a, tmp_path / 'link')
  for dirs in ([a, a], [a, b, str(tmp_path / 'link')]):
    with pytest.raises(compare.CompareError, match=re.escape(f'names {os.path.realpath(a)} twice')):
      compare.run_compare(dirs, str(tmp_path / 'o'))
  assert not os.path.exists(tmp_path / 'o')


def test_a_missing_folder_or_a_one_tower_run_is_named(tmp_path):
  a, b = _two_runs(tmp_path)
  with pytest.raises(compare.CompareError, match='nowhere does not exist'):
    compare.run_compare([a, str(tmp_path / 'nowhere')], str(tmp_path / 'o'))
  workdir_lib.write_json(os.path.join(b, 'analysis', 'summary.json'), {'n_towers': 1})
  with pytest.raises(compare.CompareError, match=f'{b} is a one-tower run'):
    compare.run_compare([a, b], str(tmp_path / 'o'))


@pytest.mark.parametrize('damage, match', [
    (lambda t: os.urandom(2000), 'is damaged, not a CSV table'),
    (lambda t: t[:len(t) // 2], 'is damaged at line'),  # cut inside a row
    (lambda t: t.replace(b'\n10,', b'\n11,', 1), 'is damaged at line 12'),  # a row lost
    (lambda t: t.replace(b',30,', b',,', 1), 'is damaged at line 2'),  # a count lost
])
def test_a_damaged_preference_csv_is_one_error(tmp_path, damage, match):
  """Garbage was a 34-line traceback and a truncated file was read silently."""
  a, b = _two_runs(tmp_path)
  csv_path = os.path.join(b, 'analysis', 'preference.csv')
  with open(csv_path, 'rb') as f:
    text = f.read()
  with open(csv_path, 'wb') as f:
    f.write(damage(text))
  with pytest.raises(errors.UserError, match=match) as e:
    compare.run_compare([a, b], str(tmp_path / 'o'))
  assert csv_path in str(e.value) and '\n' not in str(e.value)


def test_a_file_cut_at_a_row_end_is_found_by_the_vocab_size(tmp_path):
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  a, b = _two_runs(tmp_path)
  config = config_lib.base_config()
  config.data.vocab_size = 40  # the run's vocabulary: 40 rows, of which 30 were written
  workdir_lib.write_config(config, b)
  with pytest.raises(compare.CompareError, match='has 30 rows but the run has '
                     'data.vocab_size=40'):
    compare.run_compare([a, b], str(tmp_path / 'o'))


def test_outputs_are_written_together_strict_and_never_into_a_run(tmp_path, monkeypatch):
  """compare.json and compare.md are replaced as one staged folder (a failed write leaves
  the earlier pair); NaN is written as null; --out may not be a file, a run or a folder of
  other files."""
  a, b = _two_runs(tmp_path)
  out = str(tmp_path / 'cmp')
  compare.run_compare([a, b], out, n_boot=10)
  before = {n: open(os.path.join(out, n)).read() for n in os.listdir(out)}
  real = workdir_lib.write_text

  def full_disk(file, text):
    if file.endswith('compare.md'):
      raise OSError(28, 'No space left on device')
    return real(file, text)
  monkeypatch.setattr(workdir_lib, 'write_text', full_disk)
  with pytest.raises(compare.CompareError, match=f'cannot write the comparison to {out}'):
    compare.run_compare([a, b], out, n_boot=20)
  monkeypatch.undo()
  assert {n: open(os.path.join(out, n)).read() for n in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'cmp']
  flat = [write_run(tmp_path / n, ['x', 'y', 'z'], [30] * 3, {'probe': np.ones((3, 2))})
          for n in ('c', 'd')]  # constant preferences: no correlation (NaN)

  def refuse(constant):
    raise AssertionError(f'{constant} is not JSON')
  compare.run_compare(flat, str(tmp_path / 'flat'), n_boot=10)
  saved = json.loads((tmp_path / 'flat' / 'compare.json').read_text(), parse_constant=refuse)
  assert saved['pairs'][0]['spearman'] is None
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep')
  for bad, match in ((os.path.join(a, 'analysis', 'preference.csv'), 'is a file'),
                     (a, 'is a run directory or holds one'),
                     (str(tmp_path / 'mine'), 'holds files that are not an earlier comparison')):
    with pytest.raises(compare.CompareError, match=match):
      compare.run_compare([a, b], bad)
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep'
