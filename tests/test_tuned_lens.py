"""Tuned lens: the last layer is the model itself, a planted model whose first block alone
carries the signal is read as such, the runs it refuses, and its report section."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from twotower_jax import config as config_lib
from twotower_jax import run as run_lib
from twotower_jax.analysis import estimators as est_lib
from twotower_jax.analysis import runner
from twotower_jax.analysis import tuned_lens
from twotower_jax.report import lens as lens_report
from twotower_jax.train import loop


@pytest.fixture(scope='module')
def trained(tmp_path_factory, small_corpus_dir):
  """A tiny two-tower run (2 unrolled blocks), restored with the lens settings."""
  workdir = str(tmp_path_factory.mktemp('lens') / 'run')
  config = tiny_config(small_corpus_dir, **{
      'train.steps': 30, 'train.checkpoint_every': 30, 'train.eval_every': 30,
      'model.scan_layers': False})
  loop.train_and_evaluate(config, workdir)
  a = config.analysis
  a.lens, a.eval_windows, a.lens_windows, a.lens_steps = True, 8, 12, 50
  a.probe_eval_every, a.lens_batch = 25, 128
  config = runner.load_config(workdir, a)
  return config, run_lib.restore(config, workdir), workdir


def _context(trained, params, out):
  config, restored, _ = trained
  setup = restored.setup
  ctx = est_lib.Context(
      config=config, model=setup.model, params=params,
      eval_batches=est_lib.base.eval_batches(setup.splits.val_windows,
                                             config.analysis.eval_windows,
                                             config.train.batch_size),
      train_windows=setup.splits.train_windows, analysis_dir=str(out), step=restored.step)
  est_lib.base.tower_pass(ctx)  # the model's own loss per item
  return ctx


def test_the_lens_on_the_last_layer_is_the_model(trained, tmp_path):
  _, restored, _ = trained
  ctx = _context(trained, restored.params, tmp_path)
  res = tuned_lens.run(ctx, str(tmp_path))
  assert res['layers'] == ['input', 'block_1', 'block_2']
  kl, loss = np.asarray(res['kl']), np.asarray(res['loss'])
  # the final states already give the final distribution: KL 0, the model's own loss
  np.testing.assert_allclose(kl[:, -1], 0.0, atol=1e-6)
  np.testing.assert_allclose(loss[:, -1], res['model_loss'], rtol=1e-5)
  np.testing.assert_allclose(res['training']['identity_heldout_kl'][0][-1], 0.0, atol=1e-6)
  assert np.all(kl[:, 0] > 1e-8)  # the embeddings alone do not give it
  # training improved the input layer's lens beyond its least-squares start
  tuned = np.asarray(res['training']['heldout_kl'])
  assert np.all(tuned[:, 0] < np.asarray(res['training']['least_squares_heldout_kl'])[:, 0])
  assert os.path.exists(tmp_path / 'tuned_lens.json')


def _planted(params, shift):
  """Block 1 (the first) made to do 4x its work; block 2 writes only a constant `shift`
  pattern into the stream (its output weights zero), so it carries no signal."""
  towers = dict(params['towers'])
  first, second = dict(towers['block_0']), dict(towers['block_1'])
  for name in ('attn_out', 'mlp_out'):
    first[name] = dict(first[name], kernel=first[name]['kernel'] * 4.0)
    bias = second[name]['bias']
    pattern = shift * jnp.linspace(-1.0, 1.0, bias.shape[-1])
    second[name] = {'kernel': jnp.zeros_like(second[name]['kernel']),
                    'bias': jnp.broadcast_to(pattern, bias.shape)}
  towers['block_0'], towers['block_1'] = first, second
  return dict(params, towers=towers)


@pytest.mark.slow
@pytest.mark.parametrize('shift', [0.0, 0.5])
def test_a_planted_first_layer_signal_is_read_as_such(trained, tmp_path, shift):
  _, restored, _ = trained
  ctx = _context(trained, _planted(restored.params, shift), tmp_path)
  res = tuned_lens.run(ctx, str(tmp_path))
  kl, update = np.asarray(res['kl']), np.asarray(res['contribution'])
  identity = np.asarray(res['training']['identity_heldout_kl'])
  for k in range(2):
    # everything the model predicts is there after block 1: later layers add nothing
    assert kl[k, 1] < 1e-6 and kl[k, 2] < 1e-6 and kl[k, 0] > 100 * max(kl[k, 1], 1e-8), kl
    assert update[k, 1] > 1.0  # block 1 rewrites the stream
    if shift:  # a signal-free shift: the logit lens is fooled by it, the tuned lens is not
      assert update[k, 2] > 0.5 and identity[k, 1] > 1000 * kl[k, 1]
    else:  # block 2 adds nothing at all
      assert update[k, 2] == 0.0


def test_the_lens_refuses_runs_whose_layers_it_cannot_read():
  c = config_lib.base_config()
  c.analysis.lens = True
  c.model.tower_type = 'bilstm'
  with pytest.raises(config_lib.ConfigError, match='have read the token they predict'):
    tuned_lens.check_config(c)
  c.model.bilstm.input_shift = True  # the shifted streams have not read it
  tuned_lens.check_config(c)
  c.model.tower_type, c.model.bilstm.input_shift, c.model.pondering.steps = 'causal', False, 1
  with pytest.raises(config_lib.ConfigError, match='pondering'):
    tuned_lens.check_config(c)


def test_report_depth_view_groups_items_by_their_preference():
  """Two towers, items leaning to each: the excess loss of each group per tower and layer and
  the layer where it first halves."""
  lens = {'n_towers': 2, 'layers': ['input', 'block_1', 'block_2'],
          'items': {'token_id': [5, 6, 7], 'model_loss': [1.0, 2.0, 3.0],
                    # [tower][layer][item]: tower 0 supplies item 5 late, tower 1 item 6 early
                    'loss': [[[3.0, 2.1, 3.5], [2.0, 2.1, 3.2], [1.0, 2.0, 3.0]],
                             [[1.1, 4.0, 3.5], [1.0, 2.5, 3.1], [1.0, 2.0, 3.0]]]}}
  prefs = {'token_id': np.array([5.0, 6.0, 7.0]), 'resample_pref': np.array([1.0, -1.0, 0.1]),
           'resample_pref_lo': np.array([0.5, -1.5, -0.2]),
           'resample_pref_hi': np.array([1.5, -0.5, 0.3])}
  summary = {'tests': {'primary': 'resample/class'}, 'estimators': ['resample']}
  est, groups = lens_report.item_groups(lens, summary, prefs)
  assert est == 'resample'
  np.testing.assert_array_equal(groups[0], [True, False, False])
  np.testing.assert_array_equal(groups[1], [False, True, False])
  excess = lens_report.group_excess(lens, groups[0])
  np.testing.assert_allclose(excess, [[2.0, 1.0, 0.0], [0.1, 0.0, 0.0]])
  assert lens_report.predictable_depth(excess[0], lens['layers']) == 'block_1'
  assert lens_report.predictable_depth(lens_report.group_excess(lens, groups[1])[1],
                                       lens['layers']) == 'block_1'


@pytest.mark.slow
def test_analysis_with_the_lens_reports_it(trained, tmp_path):
  """analysis.lens=True through the whole analysis: tuned_lens.json beside the other outputs
  and the report's section with its figures and the depth table."""
  config, _, workdir = trained
  config = runner.load_config(workdir, config.analysis, analysis_overrides={
      'analysis.estimators': 'resample', 'analysis.n_control': 99, 'analysis.min_count': 2})
  out = tmp_path / 'analysis'
  runner.run(config, workdir, str(out))
  text = (out / 'report.md').read_text()
  assert '## Tuned lens (each tower read at each layer)' in text
  assert 'figures/tuned_lens.png' in text and (out / 'figures' / 'tuned_lens.png').exists()
  assert "At which depth each tower's preferred items become predictable" in text
  assert (out / 'tuned_lens.json').exists()
