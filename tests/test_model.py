"""The two-tower model: causality, the concat gate's formula, N towers, independent init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import layers
from twotower_jax.model import lm as model_lib


def _model(n_towers=2, **kw):
  cfg = layers.model_config(vocab_size=50, n_towers=n_towers, n_layers=2, d_model=16, n_heads=2,
                            d_mlp=32, max_len=12, dropout=0.0, **kw)
  return model_lib.TwoTowerLM(cfg)


def _init(model, seed=0):
  tokens = jnp.zeros((1, model.cfg.max_len), jnp.int32)
  return nn.unbox(model.init({'params': jax.random.PRNGKey(seed)}, tokens)['params'])


def test_an_unrolled_scan_has_the_loops_parameters_and_outputs_without_the_loop():
  """model.scan_unroll=n_layers: the scanned stack's parameters (the same init), its logits
  and gradients to float32 noise, and no while loop in the compiled program."""
  looped, unrolled = _model(scan_layers=True), _model(scan_layers=True, scan_unroll=2)
  params = _init(looped)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, _init(unrolled))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 5, 50)
  outs = []
  for model in (looped, unrolled):
    def loss(p, model=model):
      return jnp.mean(model.apply({'params': p}, tokens)['logits_BxLxV'] ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    outs.append(step(params))
    assert (' while(' in step.lower(params).compile().as_text()) == (model is looped)
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         outs[0][1], outs[1][1])


@pytest.mark.parametrize('scan_layers', [True, False])
def test_no_information_flows_from_future_tokens(scan_layers):
  """Position row j enters only at input position j: its gradient shows what logit t reads."""
  model = _model(scan_layers=scan_layers)
  params = _init(model)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 5, 50)
  t = 4

  def logit_at_t(position_PxH):
    p = dict(params, embed=dict(params['embed'], position=position_PxH))
    return model.apply({'params': p}, tokens)['logits_BxLxV'][:, t].sum()

  grad_PxH = jax.grad(logit_at_t)(params['embed']['position'])
  per_position = np.abs(np.asarray(grad_PxH)).sum(axis=1)
  assert (per_position[:t + 1] > 0).all()  # the past and the present are used
  np.testing.assert_array_equal(per_position[t + 1:], 0.0)  # the future is not


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
  model = _model()
  params = _init(model)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 10), 5, 50)
  changed = tokens.at[0, 7].set((tokens[0, 7] + 1) % 50)
  a = model.apply({'params': params}, tokens)['logits_BxLxV']
  b = model.apply({'params': params}, changed)['logits_BxLxV']
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def _ln(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def test_concat_gate_matches_the_formula():
  model = _model(n_towers=3)
  params = _init(model)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 6), 0, 50)
  out = model.apply({'params': params}, tokens)
  h = np.asarray(out['tower_states_NxBxLxH'], np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  g = p['gate']
  joint = np.concatenate([h[0], h[1], h[2]], axis=-1)  # [h_1; h_2; h_3]
  x = _ln(joint, g['ln_in']['scale'], g['ln_in']['bias'])
  pre = x @ g['dense']['kernel'] + g['dense']['bias']
  gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
  z = _ln(gelu, g['ln_out']['scale'], g['ln_out']['bias'])
  logits = z @ p['embed']['token'].T + p['embed']['output_bias']
  np.testing.assert_allclose(np.asarray(out['logits_BxLxV']), logits, rtol=2e-4, atol=2e-4)


def test_towers_start_different_and_one_tower_runs_through_the_same_code():
  params = _init(_model(n_towers=2))
  qkv = params['towers']['blocks']['qkv']['kernel']
  assert qkv.shape[0] == 2 and not np.allclose(qkv[0], qkv[1])
  single = _model(n_towers=1)
  p1 = _init(single)
  out = single.apply({'params': p1}, jnp.ones((2, 5), jnp.int32))
  assert out['logits_BxLxV'].shape == (2, 5, 50)
  assert out['tower_states_NxBxLxH'].shape == (1, 2, 5, 16)


def test_param_count_matches_closed_form():
  v, n, layers_, h, f, p = 50, 2, 2, 16, 32, 12
  per_layer = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
  tower = layers_ * per_layer + 2 * h
  gate = 2 * n * h + (n * h * h + h) + 2 * h
  embed = v * h + p * h + v
  assert model_lib.param_count(_init(_model(n_towers=n))) == n * tower + gate + embed


def test_states_fn_edits_the_gate_input():
  model = _model()
  params = _init(model)
  tokens = jnp.ones((1, 4), jnp.int32)
  base = model.apply({'params': params}, tokens)
  same = model.apply({'params': params}, tokens, states_fn=lambda h: h)
  np.testing.assert_array_equal(base['logits_BxLxV'], same['logits_BxLxV'])
  zeroed = model.apply({'params': params}, tokens, states_fn=lambda h: h.at[1].set(0.0))
  assert not np.allclose(base['logits_BxLxV'], zeroed['logits_BxLxV'])


def test_default_config_builds_the_documented_model():
  config = config_lib.base_config()
  model = model_lib.build(config, 8000)
  shapes = jax.eval_shape(lambda: _init(model))
  assert model_lib.param_count(shapes) == 8_540_736  # README: "8.5M parameters"
