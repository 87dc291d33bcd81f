"""Gates: the latent mixture against a loop reference, one-hot reduction, posteriors, logit_sum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import gates
from twotower_jax.train import step as step_lib

import _family


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ln(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_latent_gate_matches_a_naive_loop_reference():
  model = _family.tiny_model(n_towers=3, gate='latent')
  params = _family.init(model)
  toks = _family.tokens((2, 5))
  out = model.apply({'params': params}, toks)
  h = np.asarray(out['tower_states_NxBxLxH'], np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  g, emb = p['gate'], p['embed']
  b_, l_, n = 2, 5, 3
  nll_model = -jax.nn.log_softmax(out['logits_BxLxV'], -1)
  for b in range(b_):
    for t in range(l_):
      joint = np.concatenate([h[k, b, t] for k in range(n)])
      gate_logits = _ln(joint, g['ln_in']['scale'], g['ln_in']['bias']) @ g['gate']['kernel'] \
          + g['gate']['bias']
      pi = np.exp(_log_softmax(gate_logits))
      probs = np.zeros(_family.VOCAB)
      for k in range(n):
        hd = {name: leaf[k] for name, leaf in g['heads']['dense'].items()}
        hl = {name: leaf[k] for name, leaf in g['heads']['ln'].items()}
        z = _ln(_gelu(h[k, b, t] @ hd['kernel'] + hd['bias']), hl['scale'], hl['bias'])
        logits_k = emb['token'] @ z + emb['output_bias']
        probs += pi[k] * np.exp(_log_softmax(logits_k))
      np.testing.assert_allclose(np.asarray(nll_model[b, t]), -np.log(probs), rtol=1e-4,
                                 atol=1e-4)
      np.testing.assert_allclose(np.exp(np.asarray(out['gate_log_weights_NxBxL'][:, b, t])), pi,
                                 rtol=1e-4, atol=1e-5)
  # logits_BxLxV is already a normalised log-distribution
  np.testing.assert_allclose(jax.nn.logsumexp(out['logits_BxLxV'], -1), 0.0, atol=1e-5)


@pytest.mark.parametrize('k', [0, 1])
def test_latent_gate_one_hot_on_k_gives_tower_k_cross_entropy(k):
  model = _family.tiny_model(n_towers=2, gate='latent')
  params = _family.init(model)
  gate = dict(params['gate'])
  gate['gate'] = {'kernel': jnp.zeros_like(gate['gate']['kernel']),
                  'bias': jnp.full((2,), -1e4).at[k].set(0.0)}
  params = dict(params, gate=gate)
  toks = _family.tokens((2, 8))
  out = model.apply({'params': params}, toks)
  targets, weights = toks[:, 1:], jnp.ones((2, 7))
  mix, _ = step_lib.cross_entropy(out['logits_BxLxV'][:, :-1], targets, weights)
  tower, _ = step_lib.cross_entropy(out['tower_logits_NxBxLxV'][k, :, :-1], targets, weights)
  other, _ = step_lib.cross_entropy(out['tower_logits_NxBxLxV'][1 - k, :, :-1], targets, weights)
  np.testing.assert_allclose(mix, tower, rtol=1e-6)
  assert abs(float(mix - other)) > 1e-3  # the towers differ, so the choice of k matters


def test_latent_posteriors_sum_to_one_and_match_bayes_rule():
  model = _family.tiny_model(n_towers=3, gate='latent')
  params = _family.init(model)
  toks = _family.tokens((2, 8))
  out = model.apply({'params': params}, toks)
  r = gates.latent_posteriors(out['tower_logits_NxBxLxV'], out['gate_log_weights_NxBxL'], toks)
  assert r.shape == (3, 2, 8)
  np.testing.assert_allclose(r.sum(0), 1.0, atol=1e-6)
  pi = np.exp(np.asarray(out['gate_log_weights_NxBxL'], np.float64))
  p_k = np.exp(_log_softmax(np.asarray(out['tower_logits_NxBxLxV'], np.float64)))
  t = np.asarray(toks)
  lik = np.take_along_axis(p_k, np.broadcast_to(t[None, ..., None], (3, 2, 8, 1)), -1)[..., 0]
  np.testing.assert_allclose(r, pi * lik / (pi * lik).sum(0), rtol=1e-4, atol=1e-6)


def test_logit_sum_is_the_sum_of_tower_logits():
  model = _family.tiny_model(n_towers=3, gate='logit_sum')
  params = _family.init(model)
  out = model.apply({'params': params}, _family.tokens())
  np.testing.assert_allclose(out['logits_BxLxV'], out['tower_logits_NxBxLxV'].sum(0),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('gate', ['concat', 'latent', 'logit_sum'])
def test_every_gate_runs_with_one_two_three_towers(gate):
  toks = _family.tokens((2, 6))
  for n in (1, 2, 3):
    model = _family.tiny_model(n_towers=n, gate=gate)
    out = model.apply({'params': _family.init(model)}, toks)
    assert out['logits_BxLxV'].shape == (2, 6, _family.VOCAB)
    assert out['tower_states_NxBxLxH'].shape == (n, 2, 6, 16)
    assert np.isfinite(np.asarray(out['logits_BxLxV'])).all()
    if gate != 'concat':
      assert out['tower_logits_NxBxLxV'].shape == (n, 2, 6, _family.VOCAB)


def test_latent_metrics_and_balance_loss_in_a_sharded_train_step():
  config = _family.step_config(gate='latent', **{'latent.balance_weight': 0.5})
  metrics = _family.sharded_steps(config)[0]
  means = [float(metrics['gate_mean_t0']), float(metrics['gate_mean_t1'])]
  np.testing.assert_allclose(sum(means), 1.0, atol=1e-5)
  assert 0.0 < float(metrics['gate_entropy']) <= np.log(2) + 1e-6
  kl = sum(m * np.log(2 * m) for m in means)
  np.testing.assert_allclose(metrics['aux_loss'], 0.5 * kl, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(metrics['loss'], metrics['ce'] + metrics['aux_loss'], rtol=1e-6)


@pytest.mark.parametrize('field,value,needle', [
    ('gate', 'mixture', "choose one of ['concat', 'latent', 'logit_sum']"),
    ('latent.balance_weight', -1.0, 'model.latent.balance_weight=-1.0 must be >= 0'),
])
def test_bad_gate_options_are_one_line_config_errors(field, value, needle):
  with pytest.raises(config_lib.ConfigError) as err:
    _family.step_config(**{field: value})
  assert needle in str(err.value) and '\n' not in str(err.value)


def test_latent_gate_averages_only_positions_that_carry_loss():
  """The mean gate (logged and in the balance regulariser) and its entropy are weighted by the
  loss weights: positions with weight 0 (PAD, unselected MLM positions) do not count."""
  model = _family.tiny_model(n_towers=2, gate='latent', **{'latent.balance_weight': 1.0})
  params = _family.init(model)
  toks = _family.tokens((2, 8))
  weights = jnp.zeros((2, 8)).at[:, :3].set(1.0)
  out = model.apply({'params': params}, toks, weights_BxL=weights)
  pi_NxBxL = np.exp(np.asarray(out['gate_log_weights_NxBxL']))
  want = pi_NxBxL[:, :, :3].reshape(2, -1).mean(axis=1)
  got = [float(out['metrics'][f'gate_mean_t{k}']) for k in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert not np.allclose(got, pi_NxBxL.reshape(2, -1).mean(axis=1), rtol=1e-5)
  entropy = -(pi_NxBxL * np.log(pi_NxBxL)).sum(0)[:, :3].mean()
  np.testing.assert_allclose(float(out['metrics']['gate_entropy']), entropy, rtol=1e-5)
  np.testing.assert_allclose(float(out['aux_loss']), np.sum(want * np.log(2 * want)), rtol=1e-4)
  everywhere = model.apply({'params': params}, toks)  # no weights: every position counts
  np.testing.assert_allclose(float(everywhere['metrics']['gate_mean_t0']),
                             pi_NxBxL[0].mean(), rtol=1e-5)
