"""Pondering: steps=0 is the plain model, extra passes change the output and carry gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import embeddings
from twotower_jax.train import step as step_lib

import _family


def test_zero_steps_is_exactly_the_plain_model_and_steps_change_the_output():
  toks = _family.tokens((2, 8))
  plain = _family.tiny_model()
  params = _family.init(plain)
  zero = _family.tiny_model(**{'pondering.steps': 0, 'pondering.temperature': 0.5})
  assert jax.tree.structure(_family.init(zero)) == jax.tree.structure(params)
  same = jax.tree.map(np.array_equal, _family.init(zero), params)
  assert all(jax.tree.leaves(same))  # same parameters, same init
  a = plain.apply({'params': params}, toks)
  b = zero.apply({'params': params}, toks)
  np.testing.assert_array_equal(a['logits_BxLxV'], b['logits_BxLxV'])
  np.testing.assert_array_equal(a['tower_states_NxBxLxH'], b['tower_states_NxBxLxH'])
  # pondering reuses the same parameters: the tree does not grow
  two = _family.tiny_model(**{'pondering.steps': 2})
  assert jax.tree.structure(_family.init(two)) == jax.tree.structure(params)
  c = two.apply({'params': params}, toks)
  assert not np.allclose(a['logits_BxLxV'], c['logits_BxLxV'], atol=1e-4)


def test_one_step_feeds_back_the_expected_embedding():
  """With steps=1 the towers see x + softmax(logits_0 / tau) @ E: compare by hand."""
  toks = _family.tokens((1, 8))
  plain = _family.tiny_model()
  params = _family.init(plain)
  tau = 0.7
  logits0 = plain.apply({'params': params}, toks)['logits_BxLxV']
  soft = jax.nn.softmax(logits0 / tau, -1) @ params['embed']['token']
  # the plain model with the soft embedding folded into the position table of a 1-row batch
  position = params['embed']['position'].at[:8].add(soft[0])
  manual = plain.apply({'params': dict(params, embed=dict(params['embed'], position=position))},
                       toks)['logits_BxLxV']
  pondered = _family.tiny_model(**{'pondering.steps': 1, 'pondering.temperature': tau}).apply(
      {'params': params}, toks)['logits_BxLxV']
  np.testing.assert_allclose(pondered, manual, rtol=1e-5, atol=1e-5)


def test_gradient_flows_through_every_pass():
  """d loss / d logits of pass 0 is nonzero: the first pass is trained through the second."""
  toks = _family.tokens((2, 8))
  model = _family.tiny_model(**{'pondering.steps': 1})
  params = _family.init(model)

  def loss(p):
    out = model.apply({'params': p}, toks)
    total, n = step_lib.cross_entropy(out['logits_BxLxV'][:, :-1], toks[:, 1:],
                                      jnp.ones((2, 7)))
    return total / n

  grads = jax.grad(loss)(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # the output bias enters the loss of the last pass directly and, through the soft
  # embedding, the input of that pass; compare with a gradient that stops pass 0
  plain_grads = jax.grad(lambda p: loss_stopped(model, p, toks))(params)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads, plain_grads)
  assert max(jax.tree.leaves(diff)) > 1e-6


def loss_stopped(model, params, toks):
  """The same loss with the pondering feedback cut off from the gradient."""
  def stop_soft(next_fun, args, kwargs, context):
    if isinstance(context.module, embeddings.Embedder) and context.method_name == 'soft_embed':
      return jax.lax.stop_gradient(next_fun(*args, **kwargs))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(stop_soft):
    out = model.apply({'params': params}, toks)
  total, n = step_lib.cross_entropy(out['logits_BxLxV'][:, :-1], toks[:, 1:], jnp.ones((2, 7)))
  return total / n


@pytest.mark.parametrize('gate,mode', [('latent', 'per_tower'), ('logit_sum', 'projected')])
def test_pondering_runs_with_other_gates_and_embeddings(gate, mode):
  toks = _family.tokens((2, 8))
  model = _family.tiny_model(gate=gate, n_towers=3, **{'pondering.steps': 1, 'embedding.mode': mode})
  out = model.apply({'params': _family.init(model)}, toks)
  assert out['logits_BxLxV'].shape == (2, 8, _family.VOCAB)
  assert np.isfinite(np.asarray(out['logits_BxLxV'])).all()


@pytest.mark.parametrize('field,value,needle', [
    ('pondering.steps', -1, 'model.pondering.steps=-1 must be an integer >= 0'),
    ('pondering.temperature', 0.0, 'model.pondering.temperature=0.0 must be > 0'),
])
def test_bad_pondering_options_are_one_line_config_errors(field, value, needle):
  with pytest.raises(config_lib.ConfigError) as err:
    _family.step_config(**{field: value})
  assert needle in str(err.value) and '\n' not in str(err.value)
