"""Gradient accumulation equals the large-batch step; bf16 compute keeps f32 params; remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.train import setup as setup_lib
from twotower_jax import config as config_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.model import towers
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib


def _setup(config):
  n = config.mesh.data * config.mesh.fsdp * config.mesh.tower
  mesh = sharding_lib.make_mesh(config, jax.devices()[:n])
  rules = sharding_lib.rules(config)
  model = model_lib.build(config, 64)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(model, tx, mesh, rules)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                   lr_schedule=optimizer_lib.schedule(config),
                                   grad_accum_steps=config.train.grad_accum_steps),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  state = state_lib.create_sharded(model, tx, 0, state_sh)
  return model, state, step, batch_sh


def _rows(config, seed=0):
  rng = np.random.default_rng(seed)
  rows = rng.integers(4, 64, (config.train.batch_size, config.data.seq_len + 1)).astype(np.int32)
  rows[0, -5:] = 0  # some PAD targets: weights differ between micro-batches
  rows[3, -12:] = 0
  return rows


def _tiny(tiny, **kw):
  """One device unless the test asks for a mesh: compiles stay fast."""
  base = {'model.dropout': 0.0, 'train.batch_size': 16, 'mesh.data': 1, 'mesh.tower': 1,
          'optimizer.warmup_steps': 0}
  base.update(kw)
  return tiny(**base)


def test_accumulated_gradient_equals_large_batch_gradient(tiny):
  config = _tiny(tiny)
  model, state, _, _ = _setup(config)
  window = jnp.asarray(_rows(config))
  example = towers.get('causal').make_example(window, jax.random.PRNGKey(0), model.cfg)
  rng = jax.random.PRNGKey(1)
  (loss1, aux1), g1 = jax.jit(jax.value_and_grad(
      functools.partial(step_lib.loss_fn, model=model), has_aux=True))(
          state.params, example=example, dropout_rng=rng)
  loss4, aux4, g4, lookup4 = jax.jit(functools.partial(step_lib.accumulated_grads, model=model,
                                                       k=4))(
      state.params, example=example, dropout_rng=rng)
  _, _, _, lookup1 = step_lib.grads_and_lookup(state.params, model, example, rng)
  np.testing.assert_allclose(lookup4, lookup1, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  np.testing.assert_allclose(aux4['ce'], aux1['ce'], rtol=1e-5)
  assert float(aux4['n_tokens']) == float(aux1['n_tokens']) == 16 * 32 - 17
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-7)


@pytest.mark.slow
def test_accumulated_steps_match_large_batch_steps(tiny):
  params = {}
  losses = {}
  for k in (1, 4):  # on a (data=4, tower=2) mesh: micro-batches stay spread over devices
    config = _tiny(tiny, **{'train.grad_accum_steps': k, 'mesh.data': 4, 'mesh.tower': 2})
    _, state, step, batch_sh = _setup(config)
    losses[k] = []
    for i in range(2):
      batch = sharding_lib.global_batch(_rows(config, i), batch_sh, config.train.batch_size)
      state, metrics = step(state, batch)
      losses[k].append(float(metrics['loss']))
    params[k] = jax.device_get(state.params)
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
  assert losses[1][1] != losses[1][0]  # the params did move
  for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[4])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6)


def test_bf16_policy_computes_in_bf16_and_keeps_f32_params(tiny):
  config = _tiny(tiny, **{'model.dtype': 'bfloat16', 'train.grad_accum_steps': 2})
  model, state, step, batch_sh = _setup(config)
  batch = sharding_lib.global_batch(_rows(config), batch_sh, config.train.batch_size)
  hlo = step.lower(state, batch).as_text()
  assert 'bf16' in hlo  # the tower matmuls run in bfloat16
  first = None
  for _ in range(4):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics['loss'])
  assert np.isfinite(float(metrics['loss'])) and float(metrics['loss']) < first
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}

  tokens = np.asarray(batch)[:2, :-1]
  out = model.apply({'params': state.params}, tokens)
  assert out['logits_BxLxV'].dtype == jnp.float32  # gate and output layer stay f32
  f32_out = model_lib.build(_tiny(tiny), 64).apply({'params': state.params}, tokens)
  # bf16 compute stays close to f32 compute with the same params.
  np.testing.assert_allclose(out['logits_BxLxV'], f32_out['logits_BxLxV'], atol=0.1)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_remat_changes_memory_not_results(tiny, scan_layers):
  """remat keeps the loss. 'full' recomputes the blocks' matmuls in the backward pass;
  'matmuls' keeps their outputs and recomputes only the attention scores (one matmul
  per block, for the softmax's backward) and the elementwise work."""
  losses, dots = {}, {}
  for remat in (False, 'full', 'matmuls'):
    config = _tiny(tiny, **{'model.remat': bool(remat), 'model.scan_layers': scan_layers,
                            'model.remat_policy': remat or 'full'})
    _, state, step, batch_sh = _setup(config)
    batch = sharding_lib.global_batch(_rows(config), batch_sh, config.train.batch_size)
    jaxpr = str(jax.make_jaxpr(step)(state, batch))
    assert ('remat' in jaxpr) == bool(remat)
    dots[remat] = jaxpr.count('dot_general[')
    for _ in range(2):
      state, metrics = step(state, batch)
    losses[remat] = float(metrics['loss'])
  np.testing.assert_allclose(losses['full'], losses[False], rtol=1e-5)
  np.testing.assert_allclose(losses['matmuls'], losses[False], rtol=1e-5)
  assert dots[False] < dots['matmuls'] < dots['full'], dots


def test_bad_scale_settings_are_config_errors(tiny):
  for overrides, match in (({'model.dtype': 'float16'}, 'model.dtype'),
                           ({'train.grad_accum_steps': 3}, 'grad_accum_steps'),
                           ({'train.grad_accum_steps': 0}, 'grad_accum_steps'),
                           ({'train.peak_flops': -1.0}, 'peak_flops'),
                           ({'model.remat_policy': 'some'}, 'model.remat_policy')):
    with pytest.raises(config_lib.ConfigError, match=match):
      setup_lib.check_config(tiny(**overrides))
