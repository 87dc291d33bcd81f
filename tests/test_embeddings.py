"""Embedding options: input-gradient scaling, lookup/output gradient split, modes, tying."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import embeddings
from twotower_jax.model import lm as model_lib
from twotower_jax.train import step as step_lib

import _family

sg = jax.lax.stop_gradient


def _loss(model, params, toks, perturbations=None):
  variables = {'params': params}
  if perturbations is not None:
    variables['perturbations'] = perturbations
  out = model.apply(variables, toks)
  loss, n = step_lib.cross_entropy(out['logits_BxLxV'][:, :-1], toks[:, 1:],
                                   jnp.ones(toks[:, 1:].shape))
  return loss / n


def _stop_output_side(next_fun, args, kwargs, context):
  """decode with stop_gradient on the table: only the lookup path reaches E."""
  if isinstance(context.module, embeddings.Embedder) and context.method_name == 'decode':
    (z_BxLxH,) = args
    m = context.module
    return jnp.einsum('blh,vh->blv', z_BxLxH, sg(m.token)) + m.output_bias_V
  return next_fun(*args, **kwargs)


def _stop_input_side(next_fun, args, kwargs, context):
  """encode with stop_gradient on the looked-up rows: only the output path reaches E."""
  if isinstance(context.module, embeddings.Embedder) and context.method_name == 'encode':
    toks, positions = args[0], (args[1:] or (None,))[0]
    assert positions is None and kwargs.get('token_scale', 1.0) == 1.0  # training's call
    m = context.module
    x_BxLxH = sg(jnp.take(m.token, toks, axis=0)) + m.position[:toks.shape[1]]
    return jnp.broadcast_to(x_BxLxH, (m.cfg.n_towers,) + x_BxLxH.shape)
  return next_fun(*args, **kwargs)


def _table_grad(model, params, toks, interceptor=None):
  fn = lambda p: _loss(model, p, toks)
  if interceptor is None:
    return jax.grad(fn)(params)['embed']['token']
  with nn.intercept_methods(interceptor):
    return jax.grad(fn)(params)['embed']['token']


def test_input_grad_scale_scales_only_the_lookup_part():
  toks = _family.tokens((2, 8))
  plain = _family.tiny_model()
  params = _family.init(plain)
  lookup_part = _table_grad(plain, params, toks, _stop_output_side)
  output_part = _table_grad(plain, params, toks, _stop_input_side)
  assert float(jnp.abs(lookup_part).sum()) > 0 and float(jnp.abs(output_part).sum()) > 0
  # s=1: the table's gradient is exactly the sum of the two paths
  np.testing.assert_allclose(_table_grad(plain, params, toks), lookup_part + output_part,
                             rtol=1e-4, atol=1e-6)
  for s in (3.0, 0.5):
    scaled = _family.tiny_model(**{'embedding.input_grad_scale': s})
    # same forward values (up to the rounding of s*e - (s-1)*e)
    np.testing.assert_allclose(plain.apply({'params': params}, toks)['logits_BxLxV'],
                               scaled.apply({'params': params}, toks)['logits_BxLxV'],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_table_grad(scaled, params, toks), s * lookup_part + output_part,
                               rtol=1e-4, atol=1e-6)


def test_grad_norm_metrics_split_matches_the_stop_gradient_decomposition():
  s = 2.0
  toks = _family.tokens((2, 8))
  model = _family.tiny_model(**{'embedding.input_grad_scale': s})
  params = _family.init(model)
  plain = _family.tiny_model()
  lookup_part = _table_grad(plain, params, toks, _stop_output_side)
  output_part = _table_grad(plain, params, toks, _stop_input_side)
  zeros = step_lib.zero_perturbations(model, params, toks)
  grads, pert = jax.grad(lambda p, q: _loss(model, p, toks, q), argnums=(0, 1))(params, zeros)
  m = embeddings.grad_norm_metrics(grads, embeddings.lookup_table_grad(
      model.cfg, grads['embed']['token'], pert['embed']['lookup'], toks))
  np.testing.assert_allclose(m['embed_grad_norm_input'], s * jnp.linalg.norm(lookup_part),
                             rtol=1e-4)
  np.testing.assert_allclose(m['embed_grad_norm_output'], jnp.linalg.norm(output_part),
                             rtol=1e-4)


def _embed_count(mode, tied, n=2, v=_family.VOCAB, h=16, p=8):
  """Closed-form parameter count of the embedding block."""
  if mode == 'shared':
    count = v * h + p * h
  elif mode == 'projected':
    count = v * n * h + p * n * h + n * (n * h * h) + (h * n * h if tied else 0)
  else:
    count = n * (v * h + p * h)
  return count + (0 if tied else v * h) + v


@pytest.mark.parametrize('mode', embeddings.MODES)
def test_modes_and_tying_build_run_and_count(mode):
  toks = _family.tokens((2, 8))
  for tied in (True, False):
    model = _family.tiny_model(gate='latent', **{'embedding.mode': mode, 'embedding.tied': tied})
    params = _family.init(model)
    assert model_lib.param_count(params['embed']) == _embed_count(mode, tied)
    zeros = step_lib.zero_perturbations(model, params, toks)
    grads, pert = jax.grad(lambda p, q: _loss(model, p, toks, q), argnums=(0, 1))(params, zeros)
    m = embeddings.grad_norm_metrics(grads, embeddings.lookup_table_grad(
      model.cfg, grads['embed']['token'], pert['embed']['lookup'], toks))
    total = float(jnp.linalg.norm(grads['embed']['token']))
    assert float(m['embed_grad_norm_input']) > 0
    if tied:  # the table is also the output layer, so both paths carry gradient
      assert float(m['embed_grad_norm_output']) > 1e-3 * total
      assert 'embed_grad_norm_output_matrix' not in m
    else:  # untied: all of the table's gradient arrives through the lookup
      assert float(m['embed_grad_norm_output']) <= 1e-5 * total
      np.testing.assert_allclose(m['embed_grad_norm_input'], total, rtol=1e-5)
      # the output side's gradient goes to the separate output matrix, logged on its own
      np.testing.assert_allclose(m['embed_grad_norm_output_matrix'],
                                 jnp.linalg.norm(grads['embed']['output']), rtol=1e-5)
      assert float(m['embed_grad_norm_output_matrix']) > 0


def test_per_tower_tables_give_each_tower_its_own_input():
  model = _family.tiny_model(gate='logit_sum', **{'embedding.mode': 'per_tower'})
  params = _family.init(model)
  assert not np.allclose(params['embed']['token'][0], params['embed']['token'][1])
  toks = _family.tokens((1, 8))
  # zeroing tower 1's table changes only tower 1's states
  token = params['embed']['token'].at[1].set(0.0)
  a = model.apply({'params': params}, toks)['tower_states_NxBxLxH']
  b = model.apply({'params': dict(params, embed=dict(params['embed'], token=token))},
                  toks)['tower_states_NxBxLxH']
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[1], b[1])


def test_grad_norm_metrics_in_a_sharded_train_step():
  config = _family.step_config(**{'embedding.mode': 'projected',
                                  'embedding.input_grad_scale': 5.0})
  metrics = _family.sharded_steps(config)[0]
  assert float(metrics['embed_grad_norm_input']) > 0
  assert float(metrics['embed_grad_norm_output']) > 0
  assert np.isfinite(float(metrics['loss']))


@pytest.mark.parametrize('field,value,needle', [
    ('embedding.mode', 'wide', "choose one of ['shared', 'projected', 'per_tower']"),
    ('embedding.input_grad_scale', -2.0, 'model.embedding.input_grad_scale=-2.0 must be'),
])
def test_bad_embedding_options_are_one_line_config_errors(field, value, needle):
  with pytest.raises(config_lib.ConfigError) as err:
    _family.step_config(**{field: value})
  assert needle in str(err.value) and '\n' not in str(err.value)
