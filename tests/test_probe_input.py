"""The probe's input options (docs/FIDELITY.md A4): analysis.probe_input, probe_dropout,
probe_seed_per_tower. Tiny untrained models on random windows: no corpus, no training."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.analysis import estimators as est_lib
from twotower_jax.analysis.estimators import probe
from twotower_jax.model import lm as model_lib
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import state as state_lib

VOCAB, SEQ = 64, 8


def small_config(**overrides):
  c = config_lib.base_config()
  config_lib.set_fields(c, {
      'data.vocab_size': VOCAB, 'data.seq_len': SEQ, 'model.max_len': SEQ,
      'model.n_layers': 1, 'model.d_model': 16, 'model.n_heads': 2, 'model.d_mlp': 32,
      'model.dropout': 0.2, 'train.batch_size': 4, 'mesh.tower': 1,
      'analysis.probe_windows': 12, 'analysis.probe_heldout': 0.25,
      'analysis.probe_steps': 2, 'analysis.probe_eval_every': 1, 'analysis.probe_batch_size': 2,
      **overrides})
  config_lib.validate(c)
  model_lib.check_config(c)
  return c


def context(config, params=None):
  model = model_lib.build(config, VOCAB)
  if params is None:
    params = state_lib.init(model, optimizer_lib.make(config), 0).params
  windows = np.random.default_rng(0).integers(4, VOCAB, size=(16, SEQ + 1)).astype(np.int32)
  return est_lib.Context(config=config, model=model, params=params, eval_batches=[windows[:4]],
                         train_windows=windows, analysis_dir='', step=0)


def with_trained_ln(params, seed=1):
  """Params whose head LN is not the identity init (a random scale and bias)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  ln = params['gate']['ln_in']
  new = {'scale': 1.0 + 0.5 * jax.random.normal(k1, ln['scale'].shape),
         'bias': 0.3 * jax.random.normal(k2, ln['bias'].shape)}
  return {**params, 'gate': {**params['gate'], 'ln_in': new}}


def tower_states(ctx, window):
  ex = est_lib.base.example(ctx.model, window)
  return ctx.model.apply({'params': ctx.params}, ex['inputs'],
                         deterministic=True)['tower_states_NxBxLxH']


def cached_states(ctx, window, start=0):
  forward = probe.training_states_fn(ctx)
  key = jax.random.fold_in(jax.random.PRNGKey(int(ctx.config.analysis.seed)), start)
  return np.asarray(forward(ctx.params, jnp.asarray(window), key,
                            probe.dropout_keys(ctx.config, start))[0])


def test_default_input_is_each_towers_own_state_bit_for_bit():
  ctx = context(small_config())
  window = ctx.train_windows[:4]

  @jax.jit
  def before(params, window_BxL1, key):  # the cached states before the options existed
    ex = probe.towers.get('causal').make_example(window_BxL1, key, ctx.model.cfg)
    out = ctx.model.apply({'params': params}, ex['inputs'], deterministic=True)
    return probe.split_units(ctx.config, out['tower_states_NxBxLxH'])

  key = jax.random.PRNGKey(0)
  h = np.asarray(before(ctx.params, jnp.asarray(window), key))
  got = probe.training_states_fn(ctx)(ctx.params, jnp.asarray(window), key)[0]
  np.testing.assert_array_equal(np.asarray(got), h)  # bit for bit
  np.testing.assert_array_equal(cached_states(ctx, window), h)  # dropout keys None
  np.testing.assert_allclose(h, np.asarray(tower_states(ctx, window)), atol=1e-6)
  assert probe.probe_inputs(ctx.config, ctx.model, ctx.params, h) is h
  assert probe.probe_seeds(ctx.config) == [0, 0]
  np.testing.assert_array_equal(  # heads initialised as before: one key for all
      np.asarray(probe.init_heads(ctx.config, 16, VOCAB)['dense_NxHxH']),
      np.asarray(probe.probe_init(jax.random.PRNGKey(0), 2, 16, VOCAB)['dense_NxHxH']))


@pytest.mark.parametrize('n_towers', [2, 3])
def test_joint_ln_input_is_slice_k_of_the_heads_first_layernorm(n_towers):
  config = small_config(**{'analysis.probe_input': 'joint_ln', 'model.n_towers': n_towers,
                           'model.head.ln_eps': 1e-12})
  ctx = context(config)
  ctx.params = with_trained_ln(ctx.params)
  window = ctx.train_windows[:4]
  h = np.asarray(tower_states(ctx, window), np.float64)  # N x B x L x H
  # Directly from the parameters: LN over [h_1; ...; h_N], then slice k.
  cat = np.concatenate(list(h), axis=-1)
  mu, var = cat.mean(-1, keepdims=True), cat.var(-1, keepdims=True)
  ln = ctx.params['gate']['ln_in']
  x = (cat - mu) / np.sqrt(var + 1e-12) * np.asarray(ln['scale']) + np.asarray(ln['bias'])
  d = h.shape[-1]
  want = np.stack([x[..., k * d:(k + 1) * d] for k in range(n_towers)])
  got = cached_states(ctx, window)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert not np.allclose(got, h, atol=1e-2)  # not the towers' own states
  # Scoring reads the same transform of the tower pass's states.
  scored = probe.probe_inputs(ctx.config, ctx.model, ctx.params, tower_states(ctx, window))
  np.testing.assert_allclose(np.asarray(scored), want, atol=2e-5)
  # And it is the gate's own first LayerNorm: the gate's logits from these states agree.
  out = ctx.model.apply({'params': ctx.params}, jnp.asarray(window[:, :-1]), deterministic=True)
  np.testing.assert_allclose(
      np.asarray(est_lib.base.gate_outputs(ctx.model, ctx.params, est_lib.base.example(
          ctx.model, window), tower_states(ctx, window))['logits_BxLxV']),
      np.asarray(out['logits_BxLxV']), atol=1e-5)


def test_joint_ln_one_tower_run_splits_the_normalised_units():
  config = small_config(**{'analysis.probe_input': 'joint_ln', 'model.n_towers': 1})
  ctx = context(config)
  ctx.params = with_trained_ln(ctx.params)
  window = ctx.train_windows[:4]
  normed = probe.gates.head_joint_ln(ctx.model.cfg, ctx.params['gate'], tower_states(ctx, window))
  np.testing.assert_allclose(cached_states(ctx, window),
                             np.asarray(probe.split_units(config, normed)), atol=2e-6)


def test_dropout_states_differ_from_dropout_off_and_repeat_given_the_seed():
  window = np.random.default_rng(0).integers(4, VOCAB, size=(4, SEQ + 1)).astype(np.int32)
  ctx_off = context(small_config())
  off = cached_states(ctx_off, window)
  ctx_on = context(small_config(**{'analysis.probe_dropout': True}), ctx_off.params)
  on = cached_states(ctx_on, window)
  assert on.shape == off.shape and not np.allclose(on, off, atol=1e-3)
  np.testing.assert_array_equal(cached_states(ctx_on, window), on)  # deterministic
  assert not np.allclose(cached_states(ctx_on, window, start=4), on, atol=1e-3)  # per batch
  ctx_seed1 = context(small_config(**{'analysis.probe_dropout': True, 'analysis.seed': 1}),
                      ctx_off.params)
  assert not np.allclose(cached_states(ctx_seed1, window), on, atol=1e-3)  # seed decides
  # The whole cache: same with the same seed, and the model's own loss is dropout-off.
  a, b = probe.cache_training_states(ctx_on), probe.cache_training_states(ctx_on)
  np.testing.assert_array_equal(np.asarray(a['train'][0]), np.asarray(b['train'][0]))
  assert a['model_heldout_loss'] == probe.cache_training_states(ctx_off)['model_heldout_loss']


def test_joint_ln_states_drawn_with_dropout_carry_the_heads_dropout_after_the_norm():
  """model.head.joint_ln_dropout (the original ELMo, FIDELITY.md B6): the probes' joint_ln
  training states are dropped after the norm as the head drops them in training (exact
  zeros, about model.dropout of them), not without the switch or with probe_dropout off."""
  window = np.random.default_rng(0).integers(4, VOCAB, size=(4, SEQ + 1)).astype(np.int32)
  joint = {'analysis.probe_input': 'joint_ln', 'analysis.probe_dropout': True}
  plain = context(small_config(**joint))
  params = with_trained_ln(plain.params)
  zeros = {}
  for switch, dropout in ((True, True), (False, True), (True, False)):
    fields = {**joint, 'model.head.joint_ln_dropout': switch, 'analysis.probe_dropout': dropout}
    zeros[switch, dropout] = (cached_states(context(small_config(**fields), params),
                                            window) == 0).mean()
  assert 0.1 < zeros[True, True] < 0.3  # model.dropout 0.2
  assert zeros[False, True] == 0 and zeros[True, False] == 0


def test_seed_per_tower_gives_each_head_its_own_seed():
  window = np.random.default_rng(0).integers(4, VOCAB, size=(4, SEQ + 1)).astype(np.int32)
  shared = small_config(**{'analysis.probe_dropout': True, 'analysis.seed': 5})
  own = small_config(**{'analysis.probe_dropout': True, 'analysis.seed': 5,
                        'analysis.probe_seed_per_tower': True})
  assert probe.probe_seeds(shared) == [5, 5] and probe.probe_seeds(own) == [5, 6]
  # Init: head k from its own seed.
  heads = probe.init_heads(own, 16, VOCAB)['out_NxVxH']
  for k, s in enumerate((5, 6)):
    np.testing.assert_array_equal(
        np.asarray(heads[k]), np.asarray(probe.probe_init(jax.random.PRNGKey(s), 1, 16,
                                                          VOCAB)['out_NxVxH'][0]))
  # Dropout: head k's states come from a draw with its own seed; head 0's is the shared draw.
  ctx_shared = context(shared)
  ctx_own = context(own, ctx_shared.params)
  s, o = cached_states(ctx_shared, window), cached_states(ctx_own, window)
  np.testing.assert_array_equal(o[0], s[0])
  assert not np.allclose(o[1], s[1], atol=1e-3)
  ctx_seed6 = context(small_config(**{'analysis.probe_dropout': True, 'analysis.seed': 6}),
                      ctx_shared.params)
  np.testing.assert_array_equal(o[1], cached_states(ctx_seed6, window)[1])
  # Training runs with per-head batches, and repeats exactly.
  p1, r1, c1 = probe.train_probes(ctx_own)
  p2, r2, c2 = probe.train_probes(ctx_own)
  np.testing.assert_array_equal(c1, c2)
  assert r1['curve'] == r2['curve'] and r1['steps'] == 2
  np.testing.assert_array_equal(np.asarray(p1['out_NxVxH']), np.asarray(p2['out_NxVxH']))


def test_per_head_step_equals_the_shared_step_when_the_batches_agree():
  """The per-head batch path computes what the shared path does on the same windows."""
  config = small_config()
  ctx = context(config)
  cache = probe.cache_training_states(ctx)
  h, t, w = cache['train']
  p = probe.init_heads(config, h.shape[-1], VOCAB)
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.adamw(1e-3)
  step = probe.probe_step_fn(tx)
  idx = jnp.asarray([0, 2])
  p_a, _, ce_a = step(p, tx.init(p), h, t, w, idx)
  p_b, _, ce_b = step(p, tx.init(p), h, t, w, jnp.stack([idx, idx]))
  np.testing.assert_allclose(np.asarray(ce_a), np.asarray(ce_b), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(p_a['dense_NxHxH']), np.asarray(p_b['dense_NxHxH']),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('gate', ['latent', 'logit_sum'])
def test_joint_ln_needs_the_concat_head(gate):
  c = config_lib.base_config()
  c.model.gate = gate
  c.analysis.probe_input = 'joint_ln'
  with pytest.raises(config_lib.ConfigError) as e:
    model_lib.check_config(c)
  msg = str(e.value)
  assert '\n' not in msg and f'model.gate={gate}' in msg
  assert 'model.gate=concat' in msg and 'analysis.probe_input=tower' in msg


@pytest.mark.parametrize('field,value', [('probe_input', 'joint'), ('probe_dropout', 1),
                                         ('probe_seed_per_tower', 'yes')])
def test_bad_probe_input_options_are_refused(field, value):
  c = config_lib.base_config()
  c.analysis = ml_collections.ConfigDict({**c.analysis.to_dict(), field: value})
  with pytest.raises(config_lib.ConfigError, match=f'analysis.{field}='):
    config_lib.validate(c)


def test_saved_heads_of_the_default_input_keep_their_settings_key():
  """Heads saved before the options existed (default input) are still reused: the settings
  key gains the new fields only when they differ from the default."""
  ctx = context(small_config())
  meta = probe._probe_meta(ctx)  # pylint: disable=protected-access
  assert not set(probe.INPUT_DEFAULTS) & set(meta)
  ctx = context(small_config(**{'analysis.probe_input': 'joint_ln'}), ctx.params)
  assert probe._probe_meta(ctx)['probe_input'] == 'joint_ln'  # pylint: disable=protected-access


def _legacy_copy(tmp_path, **analysis):
  """The stored legacy workdir (latent gate, its own analysis.* in config.json) with
  `analysis` fields written into its config.json."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(REPO, 'tests', 'data', 'workdir_aff3a11'), workdir)
  file = os.path.join(workdir, 'config.json')
  with open(file) as f:
    raw = json.load(f)
  raw['analysis'].update(analysis)
  with open(file, 'w') as f:
    json.dump(raw, f)
  return workdir


def test_analysis_reads_the_runs_own_analysis_settings_with_overrides_on_top(tmp_path):
  """A preset's analysis.* (config.json) reaches the analysis; command-line fields win."""
  from twotower_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  workdir = _legacy_copy(tmp_path, probe_dropout=True)
  c = runner.load_config(workdir, analysis_overrides={'analysis.min_count': 3})
  assert c.analysis.estimators == 'probe,ablation,gate'  # the run's, not the default
  assert c.analysis.probe_dropout is True and c.analysis.min_count == 3


def test_cli_reads_the_runs_probe_input_and_lets_the_command_line_change_it(tmp_path):
  from conftest import run_module  # pylint: disable=g-import-not-at-top
  workdir = _legacy_copy(tmp_path, probe_input='joint_ln')  # a latent-gate run: refused
  r = run_module('twotower_jax.analyze', f'--workdir={workdir}')
  assert r.returncode == 2 and "analysis.probe_input='joint_ln'" in r.stderr, r.stderr[-2000:]
  r = run_module('twotower_jax.analyze', f'--workdir={workdir}',
                 '--config.analysis.probe_input=tower', '--step=999')  # then stops at the step
  assert r.returncode == 2 and 'probe_input' not in r.stderr and '999' in r.stderr, r.stderr
