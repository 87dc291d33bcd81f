"""Which positions the evaluation and the analysis score: masks drawn per batch, fill rows
never scored, the probe's stopping set a random sample, the control's sign flips."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import file_config
from twotower_jax.analysis.estimators import base
from twotower_jax.analysis.estimators import probe
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import step as step_lib


def _model(tower_type, **fields):
  c = file_config('tiny')
  c.model.tower_type = tower_type
  for k, v in fields.items():
    c.model.released[k] = v
  return model_lib.build(c, c.data.vocab_size), c


def _windows(c, rows=4, fill=1, seed=0):
  """A batch of real windows (ids above the specials) with `fill` all-PAD rows at the end."""
  w = np.random.default_rng(seed).integers(len(tokenizer_lib.SPECIAL_IDS), c.data.vocab_size,
                                           size=(rows, c.data.seq_len + 1)).astype(np.int32)
  w[rows - fill:] = tokenizer_lib.PAD_ID
  return w


def test_mlm_masks_differ_between_batches_and_repeat_for_the_same_batch():
  model, c = _model('mlm')
  w = _windows(c, fill=0)
  m0, m0_again, m1 = (np.asarray(base.example(model, w, i)['weights']) for i in (0, 0, 1))
  np.testing.assert_array_equal(m0, m0_again)
  assert not np.array_equal(m0, m1)  # batch 1's masks are its own


def test_fill_rows_are_never_scored_even_with_pad_targets():
  model, c = _model('causal', pad_target=True)
  w = _windows(c, fill=2)
  weights = np.asarray(base.example(model, w, 3)['weights'])
  assert np.all(weights[2:] == 0) and np.all(weights[:2] > 0)
  params = state_lib.init(model, optimizer_lib.make(c), 0).params
  out = step_lib.eval_step(params, jnp.asarray(w), 3, model=model)
  assert float(out['weight_sum']) == 2 * c.data.seq_len  # the two real rows only


def test_training_eval_draws_mlm_masks_per_batch():
  model, c = _model('mlm')
  params = state_lib.init(model, optimizer_lib.make(c), 0).params
  w = jnp.asarray(_windows(c, fill=0))
  a, b = (float(step_lib.eval_step(params, w, i, model=model)['weight_sum']) for i in (0, 1))
  assert a != b  # different masks select different numbers of positions


def test_probe_stopping_set_is_a_random_sample():
  held = probe.heldout_windows(200, 0.1, np.random.default_rng(0))
  assert held.sum() == 20 and not held[-20:].all()
  assert held[:100].sum() > 0  # drawn from the whole corpus order
  assert probe.heldout_windows(3, 0.9, np.random.default_rng(0)).sum() == 2  # never all


def test_two_tower_control_flips_signs_of_the_difference():
  """With one occurrence per item, each shuffled draw's item sum is +-(v0 - v1)."""
  rng = np.random.default_rng(0)
  vals = rng.normal(size=(2, 30)).astype(np.float32)
  targets = np.arange(30)
  got = jax.device_get(base.item_sums(jnp.asarray(vals), jnp.asarray(targets),
                                      jnp.ones(30, bool), 30, jax.random.PRNGKey(0), 50))
  d = vals[0] - vals[1]
  np.testing.assert_allclose(np.abs(got['perm_pref_sum_KxV']), np.tile(np.abs(d), (50, 1)),
                             rtol=1e-6)
  signs = np.sign(got['perm_pref_sum_KxV'] / d)
  assert 0.35 < np.mean(signs > 0) < 0.65  # both signs, about half each


def test_mask_draws_score_each_window_again_with_new_masks():
  model, c = _model('mlm')
  windows = _windows(c, rows=6, fill=0)
  batches, docs = base.scored_batches(windows, 0, 4, draws=3)
  assert len(batches) == len(docs) == 2 * 3  # 6 windows in batches of 4, three times
  np.testing.assert_array_equal(batches[0], batches[2])  # the same windows ...
  np.testing.assert_array_equal(docs[0], docs[2])  # ... in the same documents ...
  masks = [np.asarray(base.example(model, batches[i], i)['weights']) for i in (0, 2)]
  assert not np.array_equal(*masks)  # ... with new masks
  once, _ = base.scored_batches(windows, 0, 4)
  assert len(once) == 2
