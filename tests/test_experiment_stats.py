"""The experiment's statistics (experiment/pooling.py) on synthetic numbers: the cross-fitted
class effect is centred at 0 under the null and finds a split in either direction, the
DerSimonian-Laird pooling, and the cross-seed stability with the alignment chosen on the
other half of the items."""

import numpy as np
import pytest

from twotower_jax.analysis import class_test
from twotower_jax.experiment import pooling


def _items(rng, n=240, effect=0.0, sign=1.0):
  """Synthetic class-test items: log count and item loss as covariates, the preference a
  smooth function of them plus noise, plus `effect` * sign for function words (sign: which
  tower they lean to; the towers are exchangeable)."""
  log_count = rng.uniform(np.log(20), np.log(2000), n)
  loss = rng.normal(5, 1, n)
  labels = rng.random(n) < 0.35
  pref = 0.2 * (log_count - 5) + 0.1 * loss ** 2 / 10 + rng.normal(0, 1, n)
  pref = pref + sign * effect * np.where(labels, 1.0, -1.0)
  pieces = [f'p{i}_{rng.integers(1 << 30)}' for i in range(n)]
  return pref, labels, np.stack([log_count, loss]), pooling.item_halves(pieces)


def test_item_halves_are_a_fixed_hash_of_the_piece():
  # sha256 is the same on every machine and in every process (Python's hash() is salted).
  assert pooling.item_halves(['▁the', '▁of', ',', '▁people', 'ing', '.']).tolist() == [
      1, 1, 0, 1, 1, 1]
  halves = pooling.item_halves([f'piece{i}' for i in range(2000)])
  assert 0.45 < halves.mean() < 0.55


def test_adjusted_auc_is_the_class_tests_statistic():
  rng = np.random.default_rng(0)
  pref, labels, cov, _ = _items(rng, effect=0.3)
  pref[3] = np.nan  # left out, as class_test leaves it out
  full = class_test.class_test(pref, labels, cov, n_bins=3, n_perm=99, seed=0)
  assert class_test.adjusted_auc(pref, labels, cov, 3) == pytest.approx(
      full['association']['auc'], abs=1e-12)
  # The bootstrap's weighted form: a draw that takes every item once is the same AUC.
  ok = np.isfinite(pref)
  draws = pooling._auc_draws(pref[ok], labels[ok], cov[:, ok], 3,  # pylint: disable=protected-access
                             np.ones((2, ok.sum())))
  assert draws == pytest.approx([full['association']['auc']] * 2, abs=1e-12)


def test_orientation_is_free_of_the_tower_order():
  for a, b in ((0.7, 0.6), (0.3, 0.45), (0.55, 0.4), (0.5, 0.8)):
    o = pooling.orient(a, b)
    assert o == pooling.orient(b, a) == pytest.approx(pooling.orient(1 - a, 1 - b))
  assert pooling.orient(0.7, 0.6) == pytest.approx(0.15)  # both halves agree: positive
  assert pooling.orient(0.7, 0.4) < 0  # they disagree: negative
  assert pooling.orient(0.5, 0.8) == 0.0  # one half shows nothing: no replication


def test_crossfit_effect_is_centred_at_zero_under_the_null():
  """With no class effect the cross-fitted o averages 0, where the folded |AUC - 1/2| of the
  same items is positive (the bias the cross-fit avoids)."""
  rng = np.random.default_rng(1)
  crossfit, folded = [], []
  for _ in range(200):
    pref, labels, cov, half = _items(rng, n=160)
    a, b = (class_test.adjusted_auc(pref[half == h], labels[half == h], cov[:, half == h], 3)
            for h in (0, 1))
    crossfit.append(pooling.orient(a, b))
    folded.append(abs(class_test.adjusted_auc(pref, labels, cov, 3) - 0.5))
  crossfit, folded = np.array(crossfit), np.array(folded)
  se = crossfit.std(ddof=1) / np.sqrt(crossfit.size)
  assert abs(crossfit.mean()) < 3 * se
  assert folded.mean() > 10 * folded.std(ddof=1) / np.sqrt(folded.size)


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_crossfit_effect_finds_a_split_in_either_direction(sign):
  rng = np.random.default_rng(2)
  pref, labels, cov, half = _items(rng, n=300, effect=0.6, sign=sign)
  out = pooling.crossfit_effect(pref, labels, cov, half, n_bins=3, n_boot=200, seed=0)
  assert out['effect'] > 0.1 and out['ci'][0] > 0 and out['se'] > 0
  assert out['n_boot'] == 200 and sum(out['n_items_halves']) == 300
  swapped = pooling.crossfit_effect(-pref, labels, cov, half, n_bins=3, n_boot=200, seed=0)
  assert swapped['effect'] == pytest.approx(out['effect'])  # towers swapped: the same o


def test_random_effects_is_dersimonian_laird():
  y, v = np.array([0.30, 0.10, -0.05, 0.25]), np.array([0.004, 0.006, 0.005, 0.008])
  out = pooling.random_effects(y, v)
  w = 1 / v
  q = np.sum(w * (y - np.sum(w * y) / w.sum()) ** 2)
  tau2 = (q - 3) / (w.sum() - np.sum(w ** 2) / w.sum())
  assert tau2 > 0 and out['tau2'] == pytest.approx(tau2) and out['q'] == pytest.approx(q)
  w_re = 1 / (v + tau2)
  assert out['estimate'] == pytest.approx(np.sum(w_re * y) / w_re.sum())
  assert out['se'] == pytest.approx(np.sqrt(1 / w_re.sum()))
  assert out['ci'][0] == pytest.approx(out['estimate'] - 1.959964 * out['se'], abs=1e-6)
  assert out['ci_hksj'][1] - out['ci_hksj'][0] > 0 and out['k'] == 4
  # Homogeneous estimates (Q < k - 1): tau^2 is 0, not negative, and the pooled estimate is
  # the fixed-effect one with its standard error (statsmodels 0.15's 'dl' gives tau^2 < 0).
  y2 = np.array([0.05, 0.08, 0.02])
  v2 = np.array([0.001, 0.002, 0.0015])
  out2 = pooling.random_effects(y2, v2)
  assert out2['tau2'] == 0.0
  assert out2['estimate'] == pytest.approx(np.sum(y2 / v2) / np.sum(1 / v2))
  assert out2['se'] == pytest.approx(np.sqrt(1 / np.sum(1 / v2)))
  assert pooling.random_effects([0.1, np.nan], [0.01, 0.01])['k'] == 1


def _experiment(rng, effect):
  """Three seeds' cross-fitted effects; each seed's split goes to a random tower."""
  out = [pooling.crossfit_effect(*_items(rng, n=200, effect=effect, sign=rng.choice([-1, 1])),
                                 n_bins=3, n_boot=40, seed=s) for s in range(3)]
  return pooling.random_effects([o['effect'] for o in out], [o['se'] ** 2 for o in out])


def test_pooled_null_is_centred_and_a_consistent_split_is_detected():
  rng = np.random.default_rng(3)
  nulls = np.array([_experiment(rng, 0.0)['estimate'] for _ in range(30)])
  assert abs(nulls.mean()) < 3 * nulls.std(ddof=1) / np.sqrt(nulls.size)
  split = _experiment(rng, 0.5)
  assert split['estimate'] > 0.05 and split['ci'][0] > 0 and split['p_greater'] < 0.01


def test_stability_chooses_the_alignment_on_the_other_half():
  rng = np.random.default_rng(4)
  n = 200
  half = pooling.item_halves([f'item{i}' for i in range(n)])
  truth = rng.normal(0, 1, n)
  prefs = np.stack([truth + rng.normal(0, 0.5, n), -truth + rng.normal(0, 0.5, n),
                    truth + rng.normal(0, 0.5, n)])  # seed 1's towers are the other way round
  out = pooling.stability(prefs, half, align=True, n_boot=100, seed=0, names=['a', 'b', 'c'])
  assert [(p['a'], p['b']) for p in out['pairs']] == [('a', 'b'), ('a', 'c'), ('b', 'c')]
  assert all(p['spearman'] > 0.6 and p['ci'][0] > 0.4 for p in out['pairs'])
  assert out['mean'] > 0.6 and out['ci'][0] > 0.4
  # Unrelated runs: the cross-fitted correlation averages 0, where choosing the sign on the
  # same items (|Spearman|) is biased upward.
  a, b = rng.normal(0, 1, (2, 20000, 60))  # 20000 pairs of unrelated runs
  cross = pooling.crossfit_spearman(a, b, half[:60])
  assert cross.shape == (20000,)
  assert abs(cross.mean()) < 4 * cross.std(ddof=1) / np.sqrt(cross.size)
  # Folding the correlation (what choosing the sign on the same items does) is biased up.
  naive = np.abs(pooling.crossfit_spearman(a, b, half[:60], align=False))
  assert naive.mean() > 0.05 and naive.mean() > 20 * naive.std(ddof=1) / np.sqrt(naive.size)
