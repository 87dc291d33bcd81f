"""The sharded train step on a (data=4, tower=2) mesh of 8 fake CPU devices."""

import functools

import jax
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib


def _setup(config):
  mesh = sharding_lib.make_mesh(config)
  rules = sharding_lib.rules(config)
  model = model_lib.build(config, 64)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(model, tx, mesh, rules)
  state = state_lib.create_sharded(model, tx, 0, state_sh)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                   lr_schedule=optimizer_lib.schedule(config)),
                 in_shardings=(state_sh, sharding_lib.batch_sharding(mesh, rules)),
                 out_shardings=(state_sh, sharding_lib.replicated(mesh)))
  return mesh, state, step


def test_each_tower_lives_on_its_own_devices_and_the_step_learns(tiny):
  config = tiny(**{'mesh.data': 4, 'mesh.tower': 2, 'model.dropout': 0.0,
                   'optimizer.warmup_steps': 1, 'train.steps': 40})
  mesh, state, step = _setup(config)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'tower': 2}

  kernel = state.params['towers']['blocks']['mlp_in']['kernel']  # [tower, layers, H, F]
  devices_of = [{s.device for s in kernel.addressable_shards if s.index[0] == slice(k, k + 1)}
                for k in range(2)]
  assert len(devices_of[0]) == 4 and len(devices_of[1]) == 4
  assert not devices_of[0] & devices_of[1]  # tower 0 and tower 1 share no device
  mu = state.opt_state[1][0].mu['towers']['blocks']['mlp_in']['kernel']
  assert mu.sharding.spec == kernel.sharding.spec  # so does its Adam moment
  token_table = state.params['embed']['token']
  assert token_table.sharding.is_fully_replicated  # shared by both towers

  # A fixed batch of a repeating pattern: the loss must fall.
  rows = np.tile(np.arange(5, 5 + config.data.seq_len + 1) % 60 + 4, (8, 1)).astype(np.int32)
  batch = sharding_lib.global_batch(rows, sharding_lib.batch_sharding(
      mesh, sharding_lib.rules(config)), 8)
  assert batch.sharding.spec[0] == ('data', 'fsdp')
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.5, losses
  assert int(state.step) == 15


def test_mesh_shape_resolution_and_errors():
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tower = -1, 1, 2
  assert sharding_lib.mesh_shape(c.mesh, 8) == (4, 1, 2)
  c.mesh.data = 3
  with pytest.raises(config_lib.ConfigError, match='mesh'):
    sharding_lib.mesh_shape(c.mesh, 8)
