"""The class test (analysis/class_test.py) and the statistics it rests on, against references
and on synthetic items whose answer is known: a split, a frequency effect, a better tower."""

import itertools

import numpy as np
import pytest
from scipy import sparse

from twotower_jax.analysis import class_test
from twotower_jax.analysis import clusters
from twotower_jax.analysis import stats


def _brute_stratified_auc(scores, labels, strata):
  total = pairs = 0.0
  for i, j in itertools.product(range(scores.size), repeat=2):
    if labels[i] and not labels[j] and strata[i] == strata[j]:
      total += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
      pairs += 1
  return total / pairs


@pytest.mark.parametrize('seed', range(3))
def test_stratified_auc_matches_the_pairwise_count_within_strata(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 5, 60).astype(float)  # ties
  labels = rng.random(60) < 0.4
  strata = rng.integers(0, 4, 60)
  assert class_test.stratified_auc(scores, labels, strata) == pytest.approx(
      _brute_stratified_auc(scores, labels, strata), abs=1e-12)
  # one stratum: the plain AUC
  assert class_test.stratified_auc(scores, labels, np.zeros(60)) == pytest.approx(
      stats.auc(scores, labels), abs=1e-12)


def test_strata_are_quantile_cells_of_the_covariates():
  x = np.arange(90.0)
  y = np.tile([0.0, 1.0, 2.0], 30)
  s = class_test.strata(np.stack([x, y]), 3)
  assert len(np.unique(s)) == 9
  assert len(np.unique(s[:30])) == 3 and not set(s[:30]) & set(s[60:])


def _items(rng, n=400, closed_share=0.3):
  """Items with a log count, a loss that falls with frequency, and a class that goes with
  frequency (function words are frequent)."""
  logc = rng.uniform(3, 9, n)
  closed = rng.random(n) < np.clip(closed_share * 2 * (logc - 3) / 6, 0, 1)
  loss = 10 - logc + rng.normal(0, 0.5, n)
  return logc, loss, closed


def test_a_division_of_labour_is_a_split_in_its_direction():
  rng = np.random.default_rng(0)
  logc, loss, closed = _items(rng)
  pref = np.where(closed, 0.3, -0.3) + rng.normal(0, 0.2, closed.size)
  res = class_test.class_test(pref, closed, np.stack([logc, loss]), n_bins=3, n_perm=999, seed=0)
  assert res['p'] < 0.01 and res['direction'] == 'positive->0'
  assert res['association']['auc'] > 0.8
  flipped = class_test.class_test(-pref, closed, np.stack([logc, loss]), n_bins=3, n_perm=999,
                                  seed=0)
  assert flipped['p'] < 0.01 and flipped['direction'] == 'positive->1'


@pytest.mark.parametrize('effect', ['linear', 'curved'])
def test_a_frequency_effect_is_not_a_split(effect):
  """Frequent items lean to tower 0, rare ones to tower 1, whatever their class: the plain AUC
  sees a 'split', the adjusted test does not (over 30 draws of the items)."""
  rejected, raw_rejected, aucs = 0, 0, []
  for seed in range(30):
    rng = np.random.default_rng(seed)
    logc, loss, closed = _items(rng)
    z = logc - 6
    pref = (0.2 * z if effect == 'linear' else 0.1 * z ** 2 + 0.2 * z) + rng.normal(
        0, 0.1, closed.size)
    res = class_test.class_test(pref, closed, np.stack([logc, loss]), n_bins=3, n_perm=199,
                                seed=0)
    rejected += res['p'] < 0.05
    aucs.append(res['association']['auc'])
    assert res['auc_unadjusted'] > 0.55
    # without the spline fit, 3 strata leave enough of the trend inside each to reject
    raw = class_test.association(pref, closed, class_test.strata(np.stack([logc, loss]), 3),
                                 199, 0)
    raw_rejected += 2 * min(raw['p_greater'], raw['p_less']) < 0.05
  assert rejected <= 2 and abs(np.mean(aucs) - 0.5) < 0.02
  if effect == 'linear':
    assert raw_rejected >= 8, raw_rejected


def test_one_better_tower_is_not_a_split():
  """Every item leans to tower 0, content words (harder) more: the association within strata
  can be strong, but the function words do not lean to the other tower."""
  rng = np.random.default_rng(2)
  logc, loss, closed = _items(rng)
  pref = np.where(closed, 0.05, 0.5) + rng.normal(0, 0.05, closed.size)
  res = class_test.class_test(pref, closed, np.stack([logc, loss]), n_bins=3, n_perm=999, seed=0)
  assert res['association']['p_less'] < 0.01  # the classes differ ...
  assert res['p'] > 0.5  # ... but both lean to tower 0: no split
  assert res['lean_positive']['share_positive'] > 0.6


def test_no_preference_gives_uniform_p_values():
  rng = np.random.default_rng(3)
  logc, loss, closed = _items(rng, n=200)
  ps = [class_test.class_test(rng.normal(0, 1, closed.size), closed, np.stack([logc, loss]),
                              n_bins=3, n_perm=199, seed=k)['p'] for k in range(200)]
  assert 0.0 <= np.mean(np.asarray(ps) < 0.05) <= 0.06  # Bonferroni over two directions


def test_permutation_p_is_never_zero_and_the_null_centred_at_half():
  scores = np.arange(40.0)
  labels = np.arange(40) >= 20
  res = class_test.association(scores, labels, np.zeros(40, int), n_perm=99, seed=0)
  assert res['auc'] == 1.0 and res['p_greater'] == pytest.approx(1 / 100)
  assert res['p_less'] == 1.0


def test_all_zero_preferences_lean_nowhere():
  lean = class_test.lean(np.zeros(10))
  assert lean['p_positive'] == 1.0 and lean['p_negative'] == 1.0


def test_holm_matches_the_step_down_definition():
  p = {'a': 0.01, 'b': 0.04, 'c': 0.03, 'd': float('nan')}
  adj = stats.holm(p)
  assert adj['a'] == pytest.approx(0.03) and adj['c'] == pytest.approx(0.06)
  assert adj['b'] == pytest.approx(0.06)  # monotone: never below the previous step
  assert np.isnan(adj['d'])


def test_binomial_interval_is_clopper_pearson():
  lo, hi = stats.binomial_ci(2, 20)
  assert lo == pytest.approx(0.01235, abs=1e-4) and hi == pytest.approx(0.3170, abs=1e-4)


def test_cluster_interval_widens_when_documents_disagree():
  """Two items with the same 40 values: spread evenly over 10 documents, or with whole
  documents high and low. Only the second's interval is wide."""
  even = np.tile([1.0, -1.0], 20).reshape(10, 4)
  clumped = np.repeat([1.0, -1.0], 20).reshape(10, 4)
  sums = sparse.csr_matrix(np.stack([even.sum(1), clumped.sum(1)], axis=1))
  counts = sparse.csr_matrix(np.full((10, 2), 4.0))
  mean, lo, hi = stats.cluster_mean_ci(sums, counts)
  assert mean == pytest.approx([0.0, 0.0])
  assert hi[0] - lo[0] < 1e-9 and hi[1] - lo[1] > 1.0
  # a dense input gives the same
  np.testing.assert_allclose(stats.cluster_mean_ci(sums.toarray(), counts.toarray())[2], hi)


def test_documents_of_packed_windows_follow_the_eos():
  eos = 3
  stream = np.array([5, 6, eos, 7, eos, 8, 9, 9, eos, 5, 0])  # 0 = PAD tail
  windows = np.stack([stream[i * 2:i * 2 + 3] for i in range(5)])
  docs = clusters.window_docs(windows)
  assert docs[:, :-1].reshape(-1).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]


def test_document_sums_and_bootstrap():
  acc = clusters.DocItemSums(vocab=4)
  acc.add(np.array([0, 0, 1]), np.array([2, 2, 3]), np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]))
  acc.add(np.array([1]), np.array([2]), np.array([[5.0], [1.0]]))
  r = acc.result()
  assert r['doc'].tolist() == [0, 1, 1] and r['item'].tolist() == [2, 2, 3]
  assert r['count'].tolist() == [2, 1, 1]
  np.testing.assert_allclose(r['sum_ExN'], [[3, 0], [5, 1], [3, 1]])
  w = np.tile([1.0, -1.0], (4, 1))
  boot = clusters.bootstrap_scores(r, np.array([2, 3]), w[[2, 3]], n_boot=50, seed=0)
  assert boot.shape == (50, 2)
  # item 2's preference per draw is a weighted mean of doc 0 (3/2) and doc 1 (4/1)
  ok = np.isfinite(boot[:, 0])
  assert np.all((boot[ok, 0] >= 1.5 - 1e-9) & (boot[ok, 0] <= 4 + 1e-9))
