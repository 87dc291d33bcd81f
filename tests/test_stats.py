"""Statistics against brute-force references."""

import itertools

import numpy as np
import pytest
from scipy import stats as sp_stats

from twotower_jax.analysis import stats


def brute_auc(scores, labels):
  pos, neg = scores[labels], scores[~labels]
  total = 0.0
  for p, n in itertools.product(pos, neg):
    total += 1.0 if p > n else 0.5 if p == n else 0.0
  return total / (len(pos) * len(neg))


@pytest.mark.parametrize('seed', range(5))
def test_auc_matches_pairwise_reference_with_ties(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 6, size=40).astype(float)  # many ties
  labels = rng.random(40) < 0.4
  assert stats.auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)


def test_auc_extremes_and_degenerate():
  assert stats.auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
  assert stats.auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
  assert stats.auc([1, 1, 1, 1], [False, False, True, True]) == 0.5
  assert np.isnan(stats.auc([1, 2], [True, True]))


def test_bootstrap_ci_contains_statistic_and_is_deterministic():
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 1.0, size=200)
  lo, hi = stats.bootstrap_ci(np.mean, (x,), n_boot=500, seed=3)
  assert lo < x.mean() < hi
  assert hi - lo < 0.5  # about 4 standard errors of 1/sqrt(200)
  assert (lo, hi) == stats.bootstrap_ci(np.mean, (x,), n_boot=500, seed=3)
  assert (lo, hi) != stats.bootstrap_ci(np.mean, (x,), n_boot=500, seed=4)
  assert (lo, hi) == stats.bootstrap_ci(np.mean, x, n_boot=500, seed=3)  # a bare array


def test_bootstrap_ci_resamples_jointly():
  rng = np.random.default_rng(1)
  a = rng.normal(size=300)
  b = a + 0.1 * rng.normal(size=300)
  lo, hi = stats.bootstrap_ci(stats.pearson, (a, b), n_boot=300)
  assert 0.98 < lo <= stats.pearson(a, b) <= hi <= 1.0  # pairs kept: r stays near 1


def test_bimodality_higher_for_bimodal_sample():
  rng = np.random.default_rng(0)
  uni = rng.normal(size=1000)
  bi = np.concatenate([rng.normal(-3, 1, 500), rng.normal(3, 1, 500)])
  b_uni, b_bi = stats.bimodality(uni), stats.bimodality(bi)
  assert b_uni == pytest.approx(1 / 3, abs=0.05)
  assert b_bi > 5 / 9 > b_uni
  assert np.isnan(stats.bimodality([1.0, 2.0, 3.0]))


def test_correlations_match_scipy():
  rng = np.random.default_rng(2)
  a = rng.normal(size=50)
  b = a ** 3 + rng.normal(size=50)
  assert stats.pearson(a, b) == pytest.approx(sp_stats.pearsonr(a, b)[0], abs=1e-12)
  assert stats.spearman(a, b) == pytest.approx(sp_stats.spearmanr(a, b)[0], abs=1e-12)
  assert stats.spearman(a, np.exp(a)) == pytest.approx(1.0)
  assert np.isnan(stats.pearson(a, np.ones(50)))
  b[3] = np.nan  # NaN pairs are dropped
  assert stats.spearman(a, b) == pytest.approx(
      sp_stats.spearmanr(np.delete(a, 3), np.delete(b, 3))[0], abs=1e-12)


def test_null_test_one_and_two_sided():
  null = np.random.default_rng(0).normal(size=999)
  assert stats.null_test(0.0, null)['p'] > 0.5
  assert stats.null_test(4.0, null)['p'] == pytest.approx(1 / 1000)
  assert stats.null_test(-4.0, null)['p'] == pytest.approx(1 / 1000)  # two-sided
  assert stats.null_test(-4.0, null, alternative='greater')['p'] == 1.0
  assert stats.null_test(4.0, null, alternative='greater')['p'] == pytest.approx(1 / 1000)
