"""Tower types: no leakage, MLM masking, parameter counts, presets, sharded steps per tower x gate."""

import glob
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.train import setup as setup_lib
from twotower_jax import config as config_lib
from twotower_jax.model import layers
from twotower_jax.model import lm as model_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import bilstm
from twotower_jax.model import transformer

import _family
from conftest import REPO

TOWER_TYPES = ('causal', 'mlm', 'bilstm')
GATES = ('concat', 'latent', 'logit_sum')
L = 8


def _init(model, seed=0):
  """Initialised params, jitted (faster than the eager init on CPU)."""
  toks = jnp.zeros((1, model.cfg.max_len), jnp.int32)
  return jax.jit(lambda k: nn.unbox(model.init({'params': k}, toks)['params']))(
      jax.random.PRNGKey(seed))


def _param_shapes(model):
  toks = jnp.zeros((1, model.cfg.max_len), jnp.int32)
  return nn.unbox(jax.eval_shape(model.init, {'params': jax.random.PRNGKey(0)}, toks)['params'])


def _perturbed(toks_1xL, j):
  """Token j replaced by another non-special token."""
  return toks_1xL.at[0, j].set(5 + (toks_1xL[0, j] - 5 + 7) % (_family.VOCAB - 5))


def _changed_positions(model, params, js, seed=1):
  """For each j in js, the positions t whose logits change when input token j is replaced
  (one batched apply: row 0 is the original, row i+1 has token js[i] replaced)."""
  toks = _family.tokens((1, L), seed=seed)
  batch = jnp.concatenate([toks] + [_perturbed(toks, j) for j in js])
  logits = np.asarray(jax.jit(model.apply)({'params': params}, batch)['logits_BxLxV'])
  diff = np.abs(logits[1:] - logits[:1]).max(-1)
  return [set(np.nonzero(d > 1e-6)[0].tolist()) for d in diff]


def _assert_towers_differ(params):
  """Every randomly initialised tower leaf differs between towers 0 and 1."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params['towers']):
    leaf = np.asarray(leaf)
    if np.ptp(leaf[0]) > 0:  # randomly initialised (not a constant LN scale or bias)
      assert not np.allclose(leaf[0], leaf[1]), jax.tree_util.keystr(path)


def test_causal_tower_sees_only_the_past_and_towers_start_different():
  model = _family.tiny_model(tower_type='causal', gate='latent')
  params = _init(model)
  js = (0, 3, L - 1)
  assert _changed_positions(model, params, js) == [set(range(j, L)) for j in js]
  _assert_towers_differ(params)


def test_mlm_tower_is_bidirectional():
  model = _family.tiny_model(tower_type='mlm')
  params = _init(model)
  # Every position reads every other one, earlier or later.
  assert _changed_positions(model, params, (0, 3, L - 1)) == [set(range(L))] * 3
  _assert_towers_differ(params)


def test_bilstm_each_direction_sees_only_its_side():
  """Token j reaches position t != j (t < j only backward, t > j only forward), never t == j."""
  model = _family.tiny_model(tower_type='bilstm', n_layers=2)
  params = _init(model)
  js = (0, 3, L - 1)
  assert _changed_positions(model, params, js) == [set(range(L)) - {j} for j in js]
  # The streams themselves: fwd_t reads tokens <= t, bwd_t tokens >= t.
  toks = _family.tokens((1, L))
  batch = jnp.concatenate([toks, _perturbed(toks, 3)])
  _, inter = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
      params, batch)
  fwd_NxBxLxH, bwd_NxBxLxH = (np.asarray(inter['intermediates']['towers'][k][0])
                              for k in ('fwd', 'bwd'))
  fwd_changed = np.abs(fwd_NxBxLxH[:, 1] - fwd_NxBxLxH[:, 0]).max(-1) > 1e-6  # N x L
  bwd_changed = np.abs(bwd_NxBxLxH[:, 1] - bwd_NxBxLxH[:, 0]).max(-1) > 1e-6
  np.testing.assert_array_equal(fwd_changed, np.tile(np.arange(L) >= 3, (2, 1)))
  np.testing.assert_array_equal(bwd_changed, np.tile(np.arange(L) <= 3, (2, 1)))
  _assert_towers_differ(params)


@pytest.mark.parametrize('mode', ['shared', 'projected', 'per_tower'])
def test_bilstm_input_shift_sees_both_sides_but_not_itself_in_every_embedding_mode(mode):
  """model.bilstm.input_shift (the streams read tokens t-1 and t+1, PAD at the ends) keeps
  the no-leak property with every token table (per_tower: each tower's own PAD row)."""
  model = _family.tiny_model(tower_type='bilstm', n_layers=2,
                             **{'bilstm.input_shift': True, 'embedding.mode': mode})
  params = _init(model)
  js = (0, 3, L - 1)
  assert _changed_positions(model, params, js) == [set(range(L)) - {j} for j in js]


@pytest.mark.parametrize('defect', ['zeroed', 'not_reversed'])
def test_bilstm_leak_check_catches_the_original_backward_defects(monkeypatch, defect):
  """The check above fails on a backward stream that is multiplied by zero or left unflipped."""
  stack = bilstm._lstm_stack  # pylint: disable=protected-access

  def broken(cfg, x, reverse, deterministic, name):
    if reverse and defect == 'zeroed':  # (each layer's output, the stack's output)
      outputs, y = stack(cfg, x, reverse, deterministic, name)
      return [0.0 * o for o in outputs], 0.0 * y
    return stack(cfg, x, False, deterministic, name)

  monkeypatch.setattr(bilstm, '_lstm_stack', broken)
  model = _family.tiny_model(tower_type='bilstm')
  params = _init(model)
  assert _changed_positions(model, params, (3,)) != [set(range(L)) - {3}]


def test_mlm_masking_statistics_on_a_large_batch():
  vocab = 1000
  cfg = _family.tiny_model(vocab_size=vocab).cfg
  b, l1 = 256, 129
  window = np.array(jax.random.randint(jax.random.PRNGKey(3), (b, l1), 0, vocab))
  # Plenty of special tokens and PAD runs, which must never be selected.
  window[:, ::7] = tokenizer_lib.EOS_ID
  window[:, 100:] = tokenizer_lib.PAD_ID
  window[::5, 10:14] = tokenizer_lib.MASK_ID
  ex = jax.jit(transformer.mlm_example, static_argnums=2)(jnp.asarray(window), jax.random.PRNGKey(0),
                                                     cfg)
  tokens, inputs = window[:, :-1], np.asarray(ex['inputs'])
  selected = np.asarray(ex['weights']) == 1.0
  np.testing.assert_array_equal(ex['targets'], tokens)
  special = np.isin(tokens, tokenizer_lib.SPECIAL_IDS)
  assert not selected[special].any()
  np.testing.assert_array_equal(inputs[~selected], tokens[~selected])  # unselected: untouched
  n_cand = (~special).sum()
  assert abs(selected.sum() / n_cand - 0.15) < 0.01
  sel_in, sel_tok = inputs[selected], tokens[selected]
  masked = sel_in == tokenizer_lib.MASK_ID
  same = sel_in == sel_tok
  randomised = ~masked & ~same
  assert abs(masked.mean() - 0.8) < 0.02
  assert abs(same.mean() - 0.1) < 0.015  # 10% unchanged (+ 0.1/995 random hits)
  assert abs(randomised.mean() - 0.1) < 0.015
  assert not np.isin(sel_in[randomised], tokenizer_lib.SPECIAL_IDS).any()
  assert sel_in[randomised].max() < vocab
  # A fixed key gives fixed masks (eval); another key gives others (each train step).
  again = transformer.mlm_example(jnp.asarray(window), jax.random.PRNGKey(0), cfg)
  np.testing.assert_array_equal(again['inputs'], inputs)
  other = transformer.mlm_example(jnp.asarray(window), jax.random.PRNGKey(1), cfg)
  assert (np.asarray(other['weights']) != np.asarray(ex['weights'])).any()


def test_targets_and_weights_of_causal_and_bilstm_examples():
  window = jnp.asarray([[5, 6, 7, tokenizer_lib.EOS_ID, 0, 0]])
  key = jax.random.PRNGKey(0)
  c = transformer.causal_example(window, key, None)
  np.testing.assert_array_equal(c['targets'], window[:, 1:])
  np.testing.assert_array_equal(c['weights'], [[1, 1, 1, 0, 0]])
  b = bilstm.bilstm_example(window, key, None)
  np.testing.assert_array_equal(b['inputs'], window[:, :-1])
  np.testing.assert_array_equal(b['targets'], window[:, :-1])  # token t, unseen at t
  np.testing.assert_array_equal(b['weights'], [[1, 1, 1, 1, 0]])


def _tower_params_per_tower(tower_type, h, f, n_layers):
  if tower_type == 'bilstm':
    lstm = 4 * h * h + 4 * (h * h + h)  # input kernels (no bias) + recurrent kernels and bias
    return 2 * n_layers * lstm + (2 * h * h + h) + 2 * h  # two stacks, join, final LN
  block = (h * 3 * h + 3 * h) + (h * h + h) + 2 * 2 * h + (h * f + f) + (f * h + h)
  return n_layers * block + 2 * h


@pytest.mark.parametrize('tower_type', TOWER_TYPES)
@pytest.mark.parametrize('n', [1, 3])
def test_parameter_counts_match_closed_form(tower_type, n):
  h, f, v, n_layers = 16, 32, _family.VOCAB, 2
  model = _family.tiny_model(tower_type=tower_type, n_towers=n, n_layers=n_layers)
  params = _param_shapes(model)
  per_tower = _tower_params_per_tower(tower_type, h, f, n_layers)
  assert model_lib.param_count(params['towers']) == n * per_tower
  embed = v * h + model.cfg.max_len * h + v  # shared table, positions, output bias
  gate = 2 * n * h + (n * h * h + h) + 2 * h  # concat gate: LN, Dense, LN
  assert model_lib.param_count(params) == n * per_tower + embed + gate


CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', '*.py')))


def _load(path, arg=None):
  namespace = {}
  with open(path) as fh:
    exec(compile(fh.read(), path, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['get_config']() if arg is None else namespace['get_config'](arg)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path):
  setup_lib.check_config(_load(path))


def _config_file(name):
  return [p for p in CONFIG_FILES if os.path.basename(p) == name][0]


def _tiny_preset(tower_type):
  return _load(_config_file('tiny.py'), tower_type)


@pytest.mark.parametrize('tower_type', TOWER_TYPES)
@pytest.mark.parametrize('size,layers_,width,heads', [('base', 12, 384, 12),
                                                      ('large', 24, 512, 16)])
def test_paper_presets_have_the_paper_sizes(tower_type, size, layers_, width, heads):
  c = _load(_config_file('paper.py'), f'{tower_type},{size}')
  setup_lib.check_config(c)
  m = c.model
  if tower_type == 'bilstm':  # the original ELMo's sizes (docs/FIDELITY.md B4), not these
    layers_, width, heads = 2, 256, 1
    assert m.bilstm.hidden == {'base': 2048, 'large': 4096}[size]
  assert (m.tower_type, m.n_layers, m.d_model, m.n_heads) == (tower_type, layers_, width, heads)
  assert c.data.seq_len == 128 and m.max_len == 128
  assert m.embedding.mode == ('shared' if tower_type == 'causal' else 'projected')
  tiny = _tiny_preset(tower_type)
  setup_lib.check_config(tiny)
  assert tiny.model.tower_type == tower_type and tiny.model.d_model == 64


def test_bad_tower_options_are_one_line_config_errors():
  c = _tiny_preset('rnn')
  with pytest.raises(config_lib.ConfigError, match=r"model.tower_type='rnn' is unknown"):
    setup_lib.check_config(c)
  c = _tiny_preset('bilstm')
  c.model.pondering.steps = 1
  with pytest.raises(config_lib.ConfigError, match='pondering.steps>0 with model.tower_type=bilstm'):
    setup_lib.check_config(c)
  for tower_type in TOWER_TYPES:
    c = _tiny_preset(tower_type)
    c.model.n_towers, c.mesh.tower = 3, 2
    with pytest.raises(config_lib.ConfigError, match='mesh.tower=2 does not divide model.n_towers=3'):
      setup_lib.check_config(c)


def _run(tower_type, gate, n, n_steps):
  """n_steps sharded train steps on the 8 devices (mesh.tower=2 when it divides n)."""
  config = _family.step_config(tower_type=tower_type, gate=gate)
  config.model.n_towers, config.mesh.tower = n, 2 if n % 2 == 0 else 1
  config.optimizer.lr, config.optimizer.warmup_steps = 1e-2, 1
  config.train.steps = n_steps
  setup_lib.check_config(config)
  metrics = _family.sharded_steps(config, n_steps=n_steps)
  losses = [float(m['loss']) for m in metrics]
  assert np.isfinite(losses).all(), (tower_type, gate, n, losses)
  assert all(float(m['n_tokens']) > 0 for m in metrics)
  return losses


def _assert_learns(losses):
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses


@pytest.mark.parametrize('tower_type', TOWER_TYPES)
def test_two_sharded_towers_of_each_type_learn(tower_type):
  """Towers split over mesh.tower=2; a short run on a fixed batch lowers the loss."""
  _assert_learns(_run(tower_type, 'latent', 2, 8))


@pytest.mark.slow
@pytest.mark.parametrize('tower_type', TOWER_TYPES)
@pytest.mark.parametrize('gate', GATES)
def test_sharded_steps_for_every_tower_type_gate_and_n_towers(tower_type, gate):
  """1, 2 and 3 towers per tower type x gate on the 8-device mesh; each learns."""
  for n in (1, 2, 3):
    _assert_learns(_run(tower_type, gate, n, 6))


@pytest.mark.parametrize('shape', [(16, 16), (8, 32), (48, 12)])
def test_orthogonal_init_is_orthogonal(shape):
  w = np.asarray(layers.orthogonal_init()(jax.random.PRNGKey(1), shape))
  gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
  np.testing.assert_allclose(gram, np.eye(min(shape)), atol=1e-5)
  assert not np.allclose(w, np.asarray(layers.orthogonal_init()(jax.random.PRNGKey(2), shape)))


def test_two_bilstm_towers_initialise_on_one_cpu_device():
  """With LAPACK QR inits, two vmapped LSTM stacks deadlocked XLA:CPU on one device."""
  code = ('import jax, jax.numpy as jnp; from twotower_jax.model import lm; '
          "from twotower_jax import config; c = config.base_config(); "
          "c.model.tower_type = 'bilstm'; c.model.n_layers, c.model.d_model = 2, 64; "
          "c.model.embedding.mode = 'projected'; "
          "m = lm.build(c, 300); "
          'p = jax.jit(lambda r: m.init(r, jnp.zeros((2, 16), jnp.int32)))(jax.random.PRNGKey(0)); '
          "jax.block_until_ready(p); print('ok')")
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=240, check=False)
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-2000:]
