"""PonderingLM's options (model.pondering.*), each checked against the original's definition.

The original (LUMIA-Group/PonderingLM, docs/FIDELITY.md E2-E5): e_0 = E[x] (times sqrt(d) with
scale_embeds, times steps with mutiply_pondering_steps); each pass adds softmax(l / tau) @ E'
with E' = E (times sqrt(d) with scale_embeds); residual output projections start at
std / sqrt(2 n_layers (steps + 1)). Per-tower pondering feeds tower k its own distribution.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import gates
from twotower_jax.model import layers

import _family

TAU = 0.7
ALL_ON = {'pondering.embed_scale': 'sqrt_d', 'pondering.initial_weight': 'steps',
          'pondering.init_std_scale': 'passes', 'pondering.per_tower': True}


def _passes(model, params, toks):
  """(tower inputs x_NxBxLxH of every pass, the gate's output dict of every pass)."""
  outs = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(
        context.module, tuple(g.module for g in gates.GATES.values())):
      outs.append(out)
    return out

  with nn.intercept_methods(record):
    _, state = model.apply({'params': params}, toks, mutable=['intermediates'])
  return list(state['intermediates']['towers']['tower_in']), outs


def _expected(probs, table):
  return jnp.einsum('...v,vh->...h', probs, table)


def _probs(logits, tau=TAU):
  return jax.nn.softmax(logits.astype(jnp.float32) / tau, axis=-1)


def test_defaults_are_the_switches_off_and_leave_the_plain_pondering_path():
  """Explicitly off equals the default bit for bit; the three forward switches add no
  parameters and leave the init unchanged (only init_std_scale touches the init)."""
  toks = _family.tokens((2, 8))
  base = _family.tiny_model(gate='latent', **{'pondering.steps': 2})
  off = _family.tiny_model(gate='latent', **{
      'pondering.steps': 2, 'pondering.embed_scale': 'none', 'pondering.initial_weight': 'one',
      'pondering.init_std_scale': 'none', 'pondering.per_tower': False})
  params = _family.init(base)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, _family.init(off), params)))
  np.testing.assert_array_equal(base.apply({'params': params}, toks)['logits_BxLxV'],
                                off.apply({'params': params}, toks)['logits_BxLxV'])
  forward_only = dict(ALL_ON, **{'pondering.init_std_scale': 'none'})
  on = _family.tiny_model(gate='latent', **{'pondering.steps': 2}, **forward_only)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, _family.init(on), params)))
  assert not np.allclose(base.apply({'params': params}, toks)['logits_BxLxV'],
                         on.apply({'params': params}, toks)['logits_BxLxV'], atol=1e-4)
  assert layers.residual_std(base.cfg) == 0.02 / (2 * base.cfg.n_layers) ** 0.5


def test_embed_scale_multiplies_the_input_and_the_soft_embeddings_by_sqrt_d():
  """Pass 0 reads sqrt(d) E[x] + P; pass 1 adds sqrt(d) softmax(l_0 / tau) @ E (positions
  unscaled, as GPT-2's wpe is added inside the transformer)."""
  toks = _family.tokens((2, 8))
  model = _family.tiny_model(**{'pondering.steps': 1, 'pondering.temperature': TAU,
                                'pondering.embed_scale': 'sqrt_d'})
  params = _family.init(model)
  table, pos = params['embed']['token'], params['embed']['position']
  xs, outs = _passes(model, params, toks)
  s = 16 ** 0.5
  x0 = s * table[toks] + pos[:8]
  np.testing.assert_allclose(xs[0], jnp.broadcast_to(x0, xs[0].shape), rtol=1e-6, atol=1e-6)
  x1 = x0 + s * _expected(_probs(outs[0]['logits_BxLxV']), table)
  np.testing.assert_allclose(xs[1], jnp.broadcast_to(x1, xs[1].shape), rtol=1e-5, atol=1e-5)
  # the scale matters: without it pass 1 would read E[x] + P + softmax @ E
  assert not np.allclose(xs[0][0], table[toks] + pos[:8], atol=1e-3)


@pytest.mark.parametrize('scale', ['none', 'sqrt_d'])
def test_initial_weight_steps_counts_the_first_embedding_steps_times(scale):
  """The last pass reads steps * e_0 + sum_p (expected embedding after pass p) + P."""
  toks = _family.tokens((2, 8))
  steps = 3
  model = _family.tiny_model(**{'pondering.steps': steps, 'pondering.temperature': TAU,
                                'pondering.initial_weight': 'steps',
                                'pondering.embed_scale': scale})
  params = _family.init(model)
  table, pos = params['embed']['token'], params['embed']['position']
  s = 16 ** 0.5 if scale == 'sqrt_d' else 1.0
  xs, outs = _passes(model, params, toks)
  assert len(xs) == steps + 1 and len(outs) == steps + 1
  e0 = s * table[toks]
  np.testing.assert_allclose(xs[0][0], steps * e0 + pos[:8], rtol=1e-6, atol=1e-6)
  soft = sum(s * _expected(_probs(o['logits_BxLxV']), table) for o in outs[:steps])
  np.testing.assert_allclose(xs[-1][0], steps * e0 + soft + pos[:8], rtol=1e-5, atol=1e-5)


def test_init_std_scale_divides_the_residual_projections_by_sqrt_passes():
  """Same seed: attn_out and mlp_out kernels are exactly 1/sqrt(steps + 1) of the default,
  every other parameter is unchanged, and the measured std is 0.02 / sqrt(2 L (steps+1))."""
  steps, n_layers = 3, 2
  kw = dict(d_model=64, n_heads=4, d_mlp=256, n_layers=n_layers, **{'pondering.steps': steps})
  base = _family.init(_family.tiny_model(**kw))
  scaled = _family.init(_family.tiny_model(**kw, **{'pondering.init_std_scale': 'passes'}))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(base))
  flat_s = dict(jax.tree_util.tree_leaves_with_path(scaled))
  n_scaled = 0
  for path, b in flat_b.items():
    name = jax.tree_util.keystr(path)
    if ('attn_out' in name or 'mlp_out' in name) and 'kernel' in name:
      np.testing.assert_allclose(flat_s[path], b / (steps + 1) ** 0.5, rtol=1e-6, atol=0)
      want = 0.02 / (2 * n_layers * (steps + 1)) ** 0.5
      assert abs(float(jnp.std(flat_s[path])) / want - 1) < 0.1, (name, want)
      n_scaled += 1
    else:
      np.testing.assert_array_equal(flat_s[path], b)
  assert n_scaled == 2 * n_layers  # both projections of every layer (towers stacked)


@pytest.mark.parametrize('gate,mode', [('latent', 'shared'), ('logit_sum', 'projected'),
                                       ('latent', 'per_tower')])
def test_per_tower_feeds_each_tower_its_own_distribution(gate, mode):
  """Tower k's pass-1 input is its pass-0 input plus the expectation under softmax of its
  own tower logits (through its projection or own table), not under the gate's mix. A low
  temperature sharpens the near-uniform distributions at init so the two differ clearly."""
  toks = _family.tokens((2, 8))
  tau = 0.05
  model = _family.tiny_model(gate=gate, **{'pondering.steps': 1, 'pondering.temperature': tau,
                                           'pondering.per_tower': True, 'embedding.mode': mode})
  params = _family.init(model)
  emb = params['embed']
  xs, outs = _passes(model, params, toks)
  own_NxBxLxV = _probs(outs[0]['tower_logits_NxBxLxV'], tau)
  mix_BxLxV = _probs(outs[0]['logits_BxLxV'], tau)
  for k in range(model.cfg.n_towers):
    if mode == 'per_tower':
      own, mix = _expected(own_NxBxLxV[k], emb['token'][k]), _expected(mix_BxLxV, emb['token'][k])
    else:
      own, mix = _expected(own_NxBxLxV[k], emb['token']), _expected(mix_BxLxV, emb['token'])
      if mode == 'projected':
        own, mix = own @ emb['in_proj'][k], mix @ emb['in_proj'][k]
    np.testing.assert_allclose(xs[1][k], xs[0][k] + own, rtol=1e-5, atol=1e-6)
    # the mixed distribution gives a measurably different input: the check can fail
    assert float(jnp.abs(own - mix).max()) > 0.1 * float(jnp.abs(own).max())
    assert not np.allclose(xs[1][k], xs[0][k] + mix, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('field,value,needle', [
    ('pondering.embed_scale', 'sqrt_d', 'model.pondering.embed_scale=\'sqrt_d\' needs '
                                        'model.pondering.steps > 0'),
    ('pondering.initial_weight', 'steps', 'needs model.pondering.steps > 0'),
    ('pondering.init_std_scale', 'passes', 'needs model.pondering.steps > 0'),
    ('pondering.per_tower', True, 'model.pondering.per_tower=True needs'),
])
def test_options_without_pondering_steps_are_one_line_errors(field, value, needle):
  with pytest.raises(config_lib.ConfigError) as err:
    _family.step_config(gate='latent', **{field: value})
  assert needle in str(err.value) and '\n' not in str(err.value)


@pytest.mark.parametrize('field,value', [('pondering.embed_scale', 'sqrt'),
                                         ('pondering.initial_weight', 'two'),
                                         ('pondering.init_std_scale', 'steps')])
def test_unknown_option_values_are_one_line_errors(field, value):
  with pytest.raises(config_lib.ConfigError) as err:
    _family.step_config(gate='latent', **{'pondering.steps': 1, field: value})
  assert 'is unknown' in str(err.value) and '\n' not in str(err.value)


def test_per_tower_needs_a_gate_with_tower_distributions():
  with pytest.raises(config_lib.ConfigError) as err:
    _family.step_config(gate='concat', **{'pondering.steps': 1, 'pondering.per_tower': True})
  assert 'model.gate=concat' in str(err.value) and '\n' not in str(err.value)


def test_sharded_train_steps_with_every_option_on():
  """Two towers split over mesh.tower=2 on the 8 fake devices, all four options on."""
  config = _family.step_config(gate='latent', **{'pondering.steps': 2}, **ALL_ON)
  config.optimizer.lr, config.optimizer.warmup_steps = 1e-2, 1
  metrics = _family.sharded_steps(config, n_steps=3)
  losses = [float(m['loss']) for m in metrics]
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
