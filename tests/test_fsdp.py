"""FSDP: with mesh.fsdp=4 every weight matrix and its Adam moments are split four
ways, and training gives the same losses and parameters as the unsharded run."""

import functools
import re

import jax
import numpy as np

from twotower_jax.model import partitioning
from twotower_jax.model import lm as model_lib
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib


def _run(config, n_devices, steps):
  mesh = sharding_lib.make_mesh(config, jax.devices()[:n_devices])
  rules = sharding_lib.rules(config)
  model = model_lib.build(config, 64)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(model, tx, mesh, rules)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  state = state_lib.create_sharded(model, tx, 0, state_sh)
  first = state
  step = jax.jit(partitioning.with_rules(  # as train.py: activation constraints bind
      functools.partial(step_lib.train_step, model=model, tx=tx,
                        lr_schedule=optimizer_lib.schedule(config)), mesh, rules),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  hlo = step.lower(state, jax.ShapeDtypeStruct((config.train.batch_size,
                                                config.data.seq_len + 1), np.int32,
                                               sharding=batch_sh)).compile().as_text()
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    rows = rng.integers(4, 64, (config.train.batch_size, config.data.seq_len + 1))
    state, metrics = step(state, sharding_lib.global_batch(rows.astype(np.int32), batch_sh,
                                                           config.train.batch_size))
    losses.append(float(metrics['loss']))
  return first, state, losses, hlo


def _is_matrix(path) -> bool:
  return getattr(path[-1], 'key', '') in ('kernel', 'token', 'position')


def test_fsdp_splits_params_and_moments_and_trains_like_unsharded(tiny):
  base = {'model.dropout': 0.0, 'optimizer.warmup_steps': 1, 'mesh.tower': 1}
  fsdp = tiny(**base, **{'mesh.data': 1, 'mesh.fsdp': 4})
  first, state, losses, hlo = _run(fsdp, 4, steps=3)
  # FSDP gathers weights, never the activations of the whole batch (B=8 rows, L=32).
  gathered = re.findall(r'= (\S+) all-gather\(', hlo)
  assert gathered and not [g for g in gathered if re.match(r'f32\[(2,)?8,32', g)], gathered

  mu = first.opt_state[1][0].mu
  split = 0
  for (path, p), m in zip(jax.tree_util.tree_flatten_with_path(first.params)[0],
                          jax.tree.leaves(mu)):
    shard = p.addressable_shards[0].data.shape
    if _is_matrix(path):  # every matrix has an `embed` axis: split four ways
      assert int(np.prod(shard)) * 4 == p.size, (jax.tree_util.keystr(path), shard, p.shape)
      assert m.addressable_shards[0].data.shape == shard  # its Adam moment too
      assert len({s.device for s in p.addressable_shards}) == 4
      split += p.size
  total = sum(p.size for p in jax.tree.leaves(first.params))
  assert split > 0.9 * total  # nearly every parameter lives in one quarter per device
  per_device = sum(int(np.prod(p.addressable_shards[0].data.shape))
                   for p in jax.tree.leaves(state.params))
  assert per_device < 0.35 * total

  plain = tiny(**base, **{'mesh.data': 1, 'mesh.fsdp': 1})
  _, plain_state, plain_losses, _ = _run(plain, 1, steps=3)
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  assert losses[-1] != losses[0]
  for a, b in zip(jax.tree.leaves(plain_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
