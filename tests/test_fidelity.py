"""Fidelity switches (model.head.*, docs/FIDELITY.md) against the original code's definitions.

The reference at the end is the original GPT-variant two-tower LM (hezq06/twotower_lm,
ttlm/model.py, TwoTowerGPT phase 1: two GPT-2 stacks sharing wte/wpe, then
LN(2H) -> Linear -> GELU -> LN(H) -> logits against wte plus a bias) written in numpy
from that definition, fed this project's parameters renamed to the original's
state_dict names (`original_state_dict`, the map docs/FIDELITY.md documents).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from twotower_jax import config as config_lib
from twotower_jax.model import gates
from twotower_jax.model import layers

import _family

ORIGINAL_HEAD = {'head.ln_eps': 1e-12, 'head.gelu': 'erf', 'head.init': 'torch_linear'}


def _unboxed_init(module, *args, seed=0):
  return nn.unbox(module.init({'params': jax.random.PRNGKey(seed)}, *args)['params'])


# --- each switch from the original's definition ---------------------------------------------

def test_erf_gelu_is_the_exact_form_and_tanh_stays_the_default():
  x = np.linspace(-6.0, 6.0, 2001).astype(np.float32)
  exact = 0.5 * x.astype(np.float64) * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))
  tanh = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x), 'erf')), exact, atol=2e-6)
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), tanh, atol=2e-6)
  assert np.abs(exact - tanh).max() > 1e-4  # the two forms are distinguishable here


def _head_reference(h_NxBxLxH, g, token_VxH, bias_V, eps, gelu):
  """Original head in numpy: LN([h_1; h_2]) -> x W^T + b -> GELU -> LN -> z E^T + bias."""
  x = np.concatenate(list(np.asarray(h_NxBxLxH, np.float64)), axis=-1)
  x = _ln(x, g['ln_in']['scale'], g['ln_in']['bias'], eps)
  z = gelu(x @ np.asarray(g['dense']['kernel'], np.float64) + g['dense']['bias'])
  z = _ln(z, g['ln_out']['scale'], g['ln_out']['bias'], eps)
  return z @ np.asarray(token_VxH, np.float64).T + bias_V


@pytest.mark.parametrize('eps', [1e-12, 0.3])
def test_head_ln_eps_reaches_both_head_layernorms_and_nothing_else(eps):
  model = _family.tiny_model(**{'head.ln_eps': eps, 'head.gelu': 'erf'})
  params = _family.init(model)
  params['gate'] = _randomised_ln(params['gate'])
  toks = _family.tokens()
  out = model.apply({'params': params}, toks)
  logits = _head_reference(out['tower_states_NxBxLxH'], params['gate'], params['embed']['token'],
                           params['embed']['output_bias'], eps, _gelu_erf)
  np.testing.assert_allclose(np.asarray(out['logits_BxLxV']), logits, atol=2e-5)
  # the towers keep their own LayerNorm epsilon (GPT-2's 1e-5)
  base = _family.tiny_model(**{'head.gelu': 'erf'})
  base_out = base.apply({'params': params}, toks)
  np.testing.assert_array_equal(np.asarray(out['tower_states_NxBxLxH']),
                                np.asarray(base_out['tower_states_NxBxLxH']))
  if eps == 0.3:
    assert np.abs(np.asarray(out['logits_BxLxV'] - base_out['logits_BxLxV'])).max() > 1e-3


def _torch_linear_bounds(fan_in):
  """torch.nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) weight, U(+-1/sqrt(fan_in))
  bias; kaiming bound = gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + a^2))."""
  gain = math.sqrt(2.0 / (1.0 + 5.0))
  return gain * math.sqrt(3.0 / fan_in), 1.0 / math.sqrt(fan_in)


def _check_uniform(x, bound):
  x = np.asarray(x, np.float64).ravel()
  assert np.abs(x).max() <= bound * (1 + 1e-6)
  assert np.abs(x).max() > 0.9 * bound  # uses the whole interval
  assert abs(x.std() - bound / math.sqrt(3.0)) < 0.15 * bound / math.sqrt(3.0)
  assert abs(x.mean()) < 4 * bound / math.sqrt(3.0 * x.size)


def test_torch_linear_init_has_torch_linear_bounds_and_statistics():
  model = _family.tiny_model(d_model=64, n_heads=2, d_mlp=64, **{'head.init': 'torch_linear'})
  params = _family.init(model)
  w_bound, b_bound = _torch_linear_bounds(2 * 64)
  _check_uniform(params['gate']['dense']['kernel'], w_bound)
  _check_uniform(params['gate']['dense']['bias'], b_bound)
  # the towers and the token table keep their N(0, 0.02) init
  default = _family.init(_family.tiny_model(d_model=64, n_heads=2, d_mlp=64))
  for path in (('embed', 'token'), ('towers', 'block_0', 'mlp_in', 'kernel')):
    a, b = params, default
    for key in path:
      a, b = a[key], b[key]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_torch_linear_init_of_the_per_tower_heads():
  """gate=latent: each tower's head Dense reads H features; the prior layer is unchanged."""
  model = _family.tiny_model(d_model=64, n_heads=2, d_mlp=64, gate='latent',
                             **{'head.init': 'torch_linear'})
  params = _family.init(model)
  w_bound, b_bound = _torch_linear_bounds(64)
  dense = params['gate']['heads']['dense']
  for k in range(2):
    _check_uniform(dense['kernel'][k], w_bound)
    _check_uniform(dense['bias'][k], b_bound)
  assert not np.array_equal(np.asarray(dense['kernel'][0]), np.asarray(dense['kernel'][1]))
  default = _family.init(_family.tiny_model(d_model=64, n_heads=2, d_mlp=64, gate='latent'))
  np.testing.assert_array_equal(np.asarray(params['gate']['gate']['kernel']),
                                np.asarray(default['gate']['gate']['kernel']))


@pytest.mark.parametrize('field,value,match', [
    ('ln_eps', 0.0, r'model.head.ln_eps=0.0 must be a number in \(0, 1\)'),
    ('ln_eps', 1.0, r'model.head.ln_eps=1.0 must be a number in \(0, 1\)'),
    ('gelu', 'relu', "model.head.gelu='relu' is unknown; use 'tanh' or 'erf'"),
    ('init', 'xavier', "model.head.init='xavier' is unknown; use 'normal' or 'torch_linear'"),
])
def test_bad_head_options_are_one_line_config_errors(field, value, match):
  c = config_lib.base_config()
  c.model.head[field] = value
  with pytest.raises(config_lib.ConfigError, match=match) as err:
    config_lib.validate(c)
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('gate', ['concat', 'latent'])
def test_original_head_trains_sharded_with_fsdp_and_tower_axes(gate):
  """The switched head's parameters carry the same logical names: FSDP shards gate_in."""
  config = _family.step_config(gate=gate, **ORIGINAL_HEAD)
  config.mesh.fsdp = 2
  losses = [float(m['loss']) for m in _family.sharded_steps(config, n_steps=4)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


# --- defaults unchanged ---------------------------------------------------------------------

class _PreSwitchConcatGate(nn.Module):
  """The concat gate as it was before model.head existed: eps 1e-5 norms, tanh GELU,
  N(0, 0.02) kernel and zero bias; same parameter names."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, h_NxBxLxH, decode):
    x = nn.LayerNorm(epsilon=1e-5, name='ln_in')(gates.concat_towers(h_NxBxLxH))
    z = nn.Dense(self.cfg.d_model, name='dense', kernel_init=nn.initializers.normal(0.02),
                 bias_init=nn.initializers.zeros_init())(x)
    z = nn.LayerNorm(epsilon=1e-5, name='ln_out')(nn.gelu(z, approximate=True))
    return {'logits_BxLxV': decode(z)}


def test_default_head_is_the_pre_switch_head_bit_for_bit():
  cfg = layers.model_config(vocab_size=_family.VOCAB, d_model=16, n_heads=2)
  assert (cfg.head.ln_eps, cfg.head.gelu, cfg.head.init) == (1e-5, 'tanh', 'normal')
  h = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 5, 16))
  table = jax.random.normal(jax.random.PRNGKey(4), (_family.VOCAB, 16))
  decode = lambda z: z @ table.T  # noqa: E731
  new = gates.ConcatGate(cfg)
  old = _PreSwitchConcatGate(cfg)
  p_new, p_old = _unboxed_init(new, h, decode), _unboxed_init(old, h, decode)
  assert jax.tree.structure(p_new) == jax.tree.structure(p_old)
  for a, b in zip(jax.tree.leaves(p_new), jax.tree.leaves(p_old)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  p_new = jax.tree.map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), p_new)
  np.testing.assert_array_equal(
      np.asarray(new.apply({'params': p_new}, h, decode)['logits_BxLxV']),
      np.asarray(old.apply({'params': p_new}, h, decode)['logits_BxLxV']))


def test_default_model_equals_one_built_without_the_head_section():
  """model_config's defaults and a config whose model section never mentions head agree."""
  section = config_lib.base_config().model.to_dict()
  del section['head']
  implicit = _family.tiny_model()
  explicit = _family.tiny_model(**{'head.ln_eps': 1e-5, 'head.gelu': 'tanh',
                                   'head.init': 'normal'})
  assert layers.model_config(section, _family.VOCAB).head == implicit.cfg.head
  p1, p2 = _family.init(explicit), _family.init(implicit)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  toks = _family.tokens()
  np.testing.assert_array_equal(np.asarray(explicit.apply({'params': p1}, toks)['logits_BxLxV']),
                                np.asarray(implicit.apply({'params': p1}, toks)['logits_BxLxV']))


# --- independent reference: the original GPT-variant two-tower LM ----------------------------

def _ln(x, weight, bias, eps):
  """BertLayerNorm / torch LayerNorm: biased variance, eps inside the square root."""
  x = np.asarray(x, np.float64)
  u = x.mean(-1, keepdims=True)
  s = ((x - u) ** 2).mean(-1, keepdims=True)
  return (x - u) / np.sqrt(s + eps) * np.asarray(weight, np.float64) + bias


def _gelu_erf(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))  # torch.nn.GELU()


def _gelu_new(x):
  """GPT-2's MLP activation (transformers' gelu_new): the tanh approximation."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _randomised_ln(tree):
  """LayerNorm scales/biases moved off 1/0 so a swapped or missed one shows in the logits."""
  def move(path, x):
    name = path[-1].key
    if name in ('scale', 'bias') and 'ln' in path[-2].key:
      noise = 0.2 * np.sin(np.arange(x.size).reshape(x.shape) * 1.7 + len(path))
      return np.asarray(x) + noise.astype(np.float32)
    return x
  return jax.tree_util.tree_map_with_path(move, tree)


def original_state_dict(params, n_layers):
  """This project's parameters (model.tower_type=causal, gate=concat, embedding shared and
  tied, two towers, scan_layers) under the original TwoTowerGPT's state_dict names, in
  torch's layouts (Linear weights out x in; GPT-2 Conv1D weights in x out)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  blocks, g = p['towers']['blocks'], p['gate']
  sd = {'model1.transformer.wte.weight': p['embed']['token'],
        'model1.transformer.wpe.weight': p['embed']['position'],
        'out_bias': p['embed']['output_bias'],
        'layer_norm_final.weight': g['ln_in']['scale'],
        'layer_norm_final.bias': g['ln_in']['bias'],
        'dense_act.weight': g['dense']['kernel'].T, 'dense_act.bias': g['dense']['bias'],
        'layer_norm_trans.weight': g['ln_out']['scale'],
        'layer_norm_trans.bias': g['ln_out']['bias']}
  for k in range(2):
    t = f'model{k + 1}.transformer'
    sd[f'{t}.ln_f.weight'] = p['towers']['ln_final']['scale'][k]
    sd[f'{t}.ln_f.bias'] = p['towers']['ln_final']['bias'][k]
    for i in range(n_layers):
      b = jax.tree.map(lambda x: x[k, i], blocks)  # noqa: B023
      h = b['qkv']['kernel'].shape[0]
      sd.update({
          f'{t}.h.{i}.ln_1.weight': b['ln_attn']['scale'],
          f'{t}.h.{i}.ln_1.bias': b['ln_attn']['bias'],
          f'{t}.h.{i}.attn.c_attn.weight': b['qkv']['kernel'].reshape(h, 3 * h),
          f'{t}.h.{i}.attn.c_attn.bias': b['qkv']['bias'].reshape(3 * h),
          f'{t}.h.{i}.attn.c_proj.weight': b['attn_out']['kernel'].reshape(h, h),
          f'{t}.h.{i}.attn.c_proj.bias': b['attn_out']['bias'],
          f'{t}.h.{i}.ln_2.weight': b['ln_mlp']['scale'],
          f'{t}.h.{i}.ln_2.bias': b['ln_mlp']['bias'],
          f'{t}.h.{i}.mlp.c_fc.weight': b['mlp_in']['kernel'],
          f'{t}.h.{i}.mlp.c_fc.bias': b['mlp_in']['bias'],
          f'{t}.h.{i}.mlp.c_proj.weight': b['mlp_out']['kernel'],
          f'{t}.h.{i}.mlp.c_proj.bias': b['mlp_out']['bias']})
  return sd


def _gpt2_hidden_states(sd, t, tokens_BxL, n_layers, n_heads):
  """GPT-2 (eval mode, no PAD in the input): wte + wpe, pre-LN blocks, ln_f (eps 1e-5)."""
  wte, wpe = sd['model1.transformer.wte.weight'], sd['model1.transformer.wpe.weight']
  length = tokens_BxL.shape[1]
  x = wte[tokens_BxL] + wpe[:length]
  b_, _, h = x.shape
  d = h // n_heads
  future = np.triu(np.ones((length, length), bool), 1)
  for i in range(n_layers):
    w = lambda name: sd[f'{t}.h.{i}.{name}']  # noqa: B023,E731
    a = _ln(x, w('ln_1.weight'), w('ln_1.bias'), 1e-5) @ w('attn.c_attn.weight')
    q, k, v = np.split(a + w('attn.c_attn.bias'), 3, axis=-1)
    q, k, v = (y.reshape(b_, length, n_heads, d).transpose(0, 2, 1, 3) for y in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    scores = np.where(future, np.finfo(np.float64).min, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(b_, length, h)
    x = x + y @ w('attn.c_proj.weight') + w('attn.c_proj.bias')
    m = _ln(x, w('ln_2.weight'), w('ln_2.bias'), 1e-5) @ w('mlp.c_fc.weight') + w('mlp.c_fc.bias')
    x = x + _gelu_new(m) @ w('mlp.c_proj.weight') + w('mlp.c_proj.bias')
  return _ln(x, sd[f'{t}.ln_f.weight'], sd[f'{t}.ln_f.bias'], 1e-5)


def original_gpt_two_tower_logits(sd, tokens_BxL, n_layers, n_heads):
  """TwoTowerGPT.forward, phase1: concat the towers' final states, BertLayerNorm(eps 1e-12),
  dense_act, exact GELU, BertLayerNorm, F.linear against the shared wte, plus out_bias."""
  h1 = _gpt2_hidden_states(sd, 'model1.transformer', tokens_BxL, n_layers, n_heads)
  h2 = _gpt2_hidden_states(sd, 'model2.transformer', tokens_BxL, n_layers, n_heads)
  x = _ln(np.concatenate([h1, h2], -1), sd['layer_norm_final.weight'],
          sd['layer_norm_final.bias'], 1e-12)
  x = _gelu_erf(x @ sd['dense_act.weight'].T + sd['dense_act.bias'])
  x = _ln(x, sd['layer_norm_trans.weight'], sd['layer_norm_trans.bias'], 1e-12)
  return x @ sd['model1.transformer.wte.weight'].T + sd['out_bias']


def test_original_gpt_two_tower_lm_reproduces_our_logits_with_the_switches_on():
  n_layers, n_heads = 2, 2
  model = _family.tiny_model(n_layers=n_layers, n_heads=n_heads, scan_layers=True,
                             **ORIGINAL_HEAD)
  params = _randomised_ln(_family.init(model))
  params['embed']['output_bias'] = 0.1 * jax.random.normal(jax.random.PRNGKey(7),
                                                           (_family.VOCAB,))
  toks = _family.tokens((2, 8))  # ids 1..V-1: no PAD, whose keys the original masks
  ours = np.asarray(model.apply({'params': params}, toks)['logits_BxLxV'])
  sd = original_state_dict(params, n_layers)
  ref = original_gpt_two_tower_logits(sd, np.asarray(toks), n_layers, n_heads)
  diff = np.abs(ours - ref).max()
  assert diff < 1e-6, diff  # float32 against a float64 reference: about 5e-8 measured
  # the project's defaults are measurably not the original's head on the same weights
  default = _family.tiny_model(n_layers=n_layers, n_heads=n_heads, scan_layers=True)
  off = np.asarray(default.apply({'params': params}, toks)['logits_BxLxV'])
  assert np.abs(off - ref).max() > 10 * max(diff, 1e-6)
