"""The fused output layer + cross-entropy (model/output_loss.py, train.loss_chunk): the same
loss and gradients as forming all logits and taking optax's cross-entropy of them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.model import output_loss
from twotower_jax.model import towers
from twotower_jax.train import loop
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib


def _plain(z_TxZ, table_VxZ, bias_V, targets_T, weights_T):
  logits_TxV = z_TxZ @ table_VxZ.T + bias_V
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_TxV, targets_T)
                 * weights_T)


@pytest.mark.parametrize('chunk', [8, 16, 64])  # 40 rows: 5 x 8; 3 x 14 (2 padded); 1 x 40
def test_fused_loss_and_gradients_equal_the_plain_ones(chunk):
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  z_TxZ = jax.random.normal(keys[0], (40, 16))
  table_VxZ = jax.random.normal(keys[1], (50, 16))
  bias_V = jax.random.normal(keys[2], (50,))
  targets_T = jax.random.randint(keys[3], (40,), 0, 50)
  weights_T = (jax.random.uniform(keys[4], (40,)) > 0.3).astype(jnp.float32)
  args = (z_TxZ, table_VxZ, bias_V, targets_T, weights_T)
  fused = lambda z, e, b, t, w: output_loss.cross_entropy_sum(z, e, b, t, w, chunk)
  assert float(jax.jit(fused)(*args)) == pytest.approx(float(_plain(*args)), rel=1e-6)
  grads = jax.grad(fused, argnums=(0, 1, 2, 4))(*args)
  expected = jax.grad(_plain, argnums=(0, 1, 2, 4))(*args)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Under jit with a scaled cotangent (the loss is divided by the weight in the step).
  scaled = jax.jit(jax.grad(lambda *a: 0.25 * fused(*a)))(*args)
  np.testing.assert_allclose(scaled, 0.25 * expected[0], rtol=1e-5, atol=1e-6)


def _step_config(**overrides):
  c = config_lib.base_config()
  config_lib.set_fields(c, {'model.n_layers': 1, 'model.d_model': 32, 'model.n_heads': 2,
                            'model.d_mlp': 64, 'model.max_len': 16, 'data.seq_len': 16,
                            'model.dropout': 0.0, 'optimizer.warmup_steps': 0, **overrides})
  return c


def _train_steps(config, steps=3):
  """Losses and final params of `steps` train steps (train.jit_train_step: the loop's, on
  config.mesh) of a 40-token model on one batch."""
  mesh = sharding_lib.make_mesh(config, jax.devices()[:int(np.prod(list(config.mesh.values())))])
  rules = sharding_lib.rules(config)
  model = model_lib.build(config, 40)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(model, tx, mesh, rules)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  state = state_lib.create_sharded(model, tx, 0, state_sh)
  step = loop.jit_train_step(config, model, tx, mesh, state_sh, batch_sh)
  rows = np.random.default_rng(0).integers(4, 40, (8, 17)).astype(np.int32)
  rows[1, -3:] = 0  # PAD targets carry no loss
  losses = []
  for _ in range(steps):
    state, metrics = step(state, jax.device_put(rows, batch_sh))
    losses.append(float(metrics['loss']))
  return losses, state.params


@pytest.mark.parametrize('mesh', [(1, 1, 1), (2, 2, 2)])  # (data, fsdp, tower)
def test_train_step_with_loss_chunks_equals_the_plain_step(mesh):
  """train.loss_chunk > 0 trains as 0 does, to float32 noise over three AdamW updates (a
  wrong gradient would move parameters by the learning rate, 1e-3): on one device, and
  with the batch split over data and FSDP devices (each device's rows on their own, the
  table's gradient summed over them) and the towers over two more."""
  sizes = dict(zip(('mesh.data', 'mesh.fsdp', 'mesh.tower'), mesh))
  plain_losses, plain_params = _train_steps(_step_config(**sizes))
  losses, params = _train_steps(_step_config(**sizes, **{'train.loss_chunk': 24}))
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('gate', ['concat', 'latent'])
def test_the_model_gives_the_fused_loss_where_the_gate_decodes_one_output(gate):
  """The concat gate returns its output layer's input, so the model adds `loss_sum` (equal
  to the plain CE of its logits); a mixture gate does not, and the step uses the logits."""
  model = model_lib.build(_step_config(**{'model.gate': gate}), 40)
  tokens = jnp.asarray(np.random.default_rng(1).integers(4, 40, (2, 17)), jnp.int32)
  example = towers.get('causal').make_example(tokens, jax.random.PRNGKey(0), model.cfg)
  params = model.init(jax.random.PRNGKey(0), example['inputs'])['params']
  out = model.apply({'params': params}, example['inputs'], weights_BxL=example['weights'],
                    targets_BxL=example['targets'], loss_chunk=8)
  if gate == 'latent':
    assert 'loss_sum' not in out
    return
  plain = step_lib.cross_entropy(out['logits_BxLxV'], example['targets'], example['weights'])
  assert float(out['loss_sum']) == pytest.approx(float(plain[0]), rel=1e-6)
  assert 'loss_sum' not in model.apply({'params': params}, example['inputs'])


def test_loss_chunk_must_be_a_whole_number_of_rows():
  config = _step_config(**{'train.loss_chunk': -1})
  with pytest.raises(config_lib.ConfigError, match=r'train.loss_chunk=-1 must be an integer '
                     r'>= 0'):
    config_lib.validate(config)
