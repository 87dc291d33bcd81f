"""The original code's as-released behaviours (model.released.*) and attention dropout
(model.attention_dropout), each checked on a tiny example against its definition in
hezq06/twotower_lm (docs/FIDELITY.md rows B5, A1, A2, A3); defaults leave the model as it was.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import attention
from twotower_jax.model import bilstm
from twotower_jax.model import transformer
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import step as step_lib

import _family

PAD = tokenizer_lib.PAD_ID
OFF = {'attention_dropout': 0.0, 'released.zero_backward': False,
       'released.pad_target': False, 'released.mask_pad_keys': False}


def _init(model, seed=0):
  toks = jnp.zeros((1, model.cfg.max_len), jnp.int32)
  return jax.jit(lambda k: nn.unbox(model.init({'params': k}, toks)['params']))(
      jax.random.PRNGKey(seed))


def _states(model, params, toks_BxL, **kw):
  """Tower states h_NxBxLxH (deterministic unless a dropout rng is given)."""
  return np.asarray(model.apply({'params': params}, toks_BxL, **kw)['tower_states_NxBxLxH'])


def _replaced(toks_BxL, j):
  """Row 0 unchanged, row 1 with token j replaced by another non-special token."""
  other = 5 + (toks_BxL[0, j] - 5 + 7) % (_family.VOCAB - 5)
  return jnp.concatenate([toks_BxL, toks_BxL.at[0, j].set(other)])


@pytest.mark.parametrize('tower_type', ['causal', 'mlm', 'bilstm'])
def test_defaults_leave_params_and_logits_bit_identical(tower_type):
  """Same init key: the default model and one with every switch written off agree exactly, and
  attention dropout > 0 leaves the deterministic (eval) forward exactly as it was."""
  toks = _family.tokens((2, 8))
  default = _family.tiny_model(tower_type=tower_type, n_layers=2, scan_layers=True)
  off = _family.tiny_model(tower_type=tower_type, n_layers=2, scan_layers=True, **OFF)
  p_default, p_off = _init(default), _init(off)
  jax.tree.map(np.testing.assert_array_equal, p_default, p_off)
  logits = lambda m, p: np.asarray(m.apply({'params': p}, toks)['logits_BxLxV'])
  np.testing.assert_array_equal(logits(default, p_default), logits(off, p_off))
  if tower_type != 'bilstm':
    dropped = _family.tiny_model(tower_type=tower_type, n_layers=2, scan_layers=True,
                                 attention_dropout=0.5)
    p_dropped = _init(dropped)
    jax.tree.map(np.testing.assert_array_equal, p_default, p_dropped)
    np.testing.assert_array_equal(logits(default, p_default), logits(dropped, p_dropped))


@pytest.mark.parametrize('length', [8, 7])
def test_zero_backward_leaves_the_backward_stream_no_information(length):
  """flip_seq's einsum 'bwl,ww->bwl' keeps the anti-identity's diagonal: for an even window
  no position reads a later token; for an odd one only the middle position still does."""
  np.testing.assert_array_equal(bilstm.anti_identity_diagonal(4), [0, 0, 0, 0])
  np.testing.assert_array_equal(bilstm.anti_identity_diagonal(5), [0, 0, 1, 0, 0])
  model = _family.tiny_model(tower_type='bilstm', n_layers=2, **{'released.zero_backward': True})
  params = _init(model)
  toks = _family.tokens((1, length))
  middle = {(length - 1) // 2} if length % 2 else set()
  for j in range(length):
    h_NxBxLxH = _states(model, params, _replaced(toks, j))
    changed = set(np.nonzero(np.abs(h_NxBxLxH[:, 1] - h_NxBxLxH[:, 0]).max((0, 2)) > 1e-6)[0])
    later_reads = {t for t in middle if t < j}  # the middle still reads tokens after it
    assert changed == set(range(j + 1, length)) | later_reads, (j, changed)


def test_pad_target_gives_pad_targets_loss_weight():
  """No ignore index: PAD targets count in the loss like any other token."""
  window = jnp.asarray([[5, 6, 7, tokenizer_lib.EOS_ID, PAD, PAD]])
  model = _family.tiny_model(**{'released.pad_target': True})
  for make in (transformer.causal_example, bilstm.bilstm_example):
    np.testing.assert_array_equal(make(window, None, model.cfg)['weights'], [[1] * 5])
    assert make(window, None, _family.tiny_model().cfg)['weights'][0, -1] == 0
  params = _init(model)
  example = transformer.causal_example(window, None, model.cfg)
  _, aux = step_lib.loss_fn(params, model, example, jax.random.PRNGKey(0))
  logits_BxLxV = model.apply({'params': params}, example['inputs'])['logits_BxLxV']
  losses_L = -jax.nn.log_softmax(logits_BxLxV[0], -1)[jnp.arange(5), example['targets'][0]]
  assert float(aux['n_tokens']) == 5
  np.testing.assert_allclose(float(aux['ce']), float(losses_L.mean()), rtol=1e-5)
  # A PAD target replaced by a real token changes the loss: PAD targets are scored.
  other = dict(example, targets=example['targets'].at[0, -1].set(9))
  _, aux_other = step_lib.loss_fn(params, model, other, jax.random.PRNGKey(0))
  assert abs(float(aux_other['ce']) - float(aux['ce'])) > 1e-4


@pytest.mark.parametrize('tower_type', ['causal', 'mlm'])
def test_mask_pad_keys_gives_pad_keys_no_attention(tower_type):
  """The content at PAD positions (the PAD embedding row) reaches no non-PAD position with the
  mask on, and does reach them with it off (so the check can fail)."""
  toks = jnp.asarray([[7, 8, PAD, 9, 10, PAD, 11, 12], [PAD, 6, 7, 8, 9, 10, 11, PAD]])
  real_BxL = np.asarray(toks != PAD)
  for mask in (True, False):
    model = _family.tiny_model(tower_type=tower_type, n_layers=2,
                               **{'released.mask_pad_keys': mask})
    params = _init(model)
    moved = jax.tree.map(lambda x: x, params)
    moved['embed']['token'] = params['embed']['token'].at[PAD].add(1.0)
    h0, h1 = _states(model, params, toks), _states(model, moved, toks)
    assert np.isfinite(h0).all()
    diff_BxL = np.abs(h1 - h0).max((0, 3))
    if mask:
      assert diff_BxL[real_BxL].max() == 0.0
      assert diff_BxL[~real_BxL].min() > 1e-6  # a PAD position still reads its own input
    else:
      assert diff_BxL[real_BxL].min() > 1e-6 if tower_type == 'mlm' else (
          diff_BxL[0, 3:].min() > 1e-6)


def test_attention_dropout_changes_training_outputs_only():
  """Probabilities dropped in training (different keys, different outputs); none at eval."""
  toks = _family.tokens((2, 8))
  model = _family.tiny_model(n_layers=2, attention_dropout=0.3)
  params = _init(model)
  train = lambda seed: _states(model, params, toks, deterministic=False,
                               rngs={'dropout': jax.random.PRNGKey(seed)})
  eval_ = _states(model, params, toks)
  assert np.abs(train(0) - eval_).max() > 1e-4
  assert np.abs(train(0) - train(1)).max() > 1e-4
  np.testing.assert_array_equal(eval_, _states(model, params, toks, deterministic=True))
  plain = _family.tiny_model(n_layers=2)  # model.dropout 0, no attention dropout: no noise
  np.testing.assert_array_equal(
      _states(plain, params, toks, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)}),
      eval_)


def _preset(tower_type, **fields):
  c = _family.step_config(tower_type=tower_type)
  config_lib.set_fields(c.model, fields)
  return c


@pytest.mark.parametrize('fields,match', [
    ({'attention': 'cudnn', 'attention_dropout': 0.1}, "model.attention='cudnn' has no attention"),
    ({'attention': 'splash', 'released.mask_pad_keys': True}, "model.attention='splash' has no"),
    ({'attention_dropout': 1.0}, r'model.attention_dropout=1.0 must be in \[0, 1\)'),
    ({'released.zero_backward': True}, 'zero_backward needs a tower type with a backward'),
])
def test_bad_switches_are_one_line_config_errors(fields, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    setup_lib.check_config(_preset('causal', **fields))
  with pytest.raises(config_lib.ConfigError, match='tower_type=bilstm has no attention'):
    setup_lib.check_config(_preset('bilstm', **{'released.mask_pad_keys': True}))


@pytest.mark.parametrize('tower_type,fields', [
    ('causal', {'attention_dropout': 0.1, 'released.mask_pad_keys': True,
                'released.pad_target': True, 'scan_layers': True}),
    ('mlm', {'attention_dropout': 0.1, 'released.mask_pad_keys': True,
             'released.pad_target': True}),
    ('bilstm', {'released.zero_backward': True, 'released.pad_target': True}),
])
def test_sharded_train_steps_with_every_switch_on(tower_type, fields):
  """Two towers split over mesh.tower=2 on the 8 fake devices: finite losses, weighted tokens."""
  config = _preset(tower_type, **fields)
  setup_lib.check_config(config)
  metrics = _family.sharded_steps(config, n_steps=2)
  assert all(np.isfinite(float(m['loss'])) and float(m['n_tokens']) > 0 for m in metrics)


def test_switches_that_need_the_probabilities_take_xla_attention():
  """`auto` on CUDA picks cuDNN flash attention, except where the probabilities must be formed
  (attention dropout, PAD key mask): cuDNN's kernel has neither."""
  cfg = lambda **kw: _family.tiny_model(dtype='bfloat16', **kw).cfg
  assert attention.implementation(cfg(), 'cuda') == 'cudnn'
  assert attention.implementation(cfg(attention_dropout=0.1), 'cuda') == 'xla'
  assert attention.implementation(cfg(**{'released.mask_pad_keys': True}), 'cuda') == 'xla'
