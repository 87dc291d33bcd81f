"""Shared helpers for the gate, embedding and pondering tests: tiny models and one sharded step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.train import setup as setup_lib
from twotower_jax import config as config_lib
from twotower_jax.model import layers
from twotower_jax.model import lm as model_lib
from twotower_jax.train import optimizer
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib

VOCAB = 40


def tiny_model(vocab_size=VOCAB, **kw) -> model_lib.TwoTowerLM:
  """Dotted model fields as keywords, e.g. tiny_model(**{'embedding.mode': 'per_tower'})."""
  base = dict(n_towers=2, n_layers=1, d_model=16, n_heads=2, d_mlp=32, max_len=8, dropout=0.0,
              scan_layers=False)
  base.update(kw)
  return model_lib.TwoTowerLM(layers.model_config(vocab_size=vocab_size, **base))


def init(model, seed=0):
  tokens = jnp.zeros((1, model.cfg.max_len), jnp.int32)
  return nn.unbox(model.init({'params': jax.random.PRNGKey(seed)}, tokens)['params'])


def tokens(shape=(2, 8), seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, VOCAB)


def step_config(**model_overrides):
  """A base config small enough for one sharded step on the 8 fake devices."""
  c = config_lib.base_config()
  c.data.seq_len = 8
  c.model.n_layers, c.model.d_model, c.model.n_heads = 1, 16, 2
  c.model.d_mlp, c.model.max_len, c.model.dropout = 32, 8, 0.0
  c.model.scan_layers = False
  c.train.batch_size, c.train.steps = 8, 4
  c.mesh.tower = 2
  config_lib.set_fields(c.model, model_overrides)
  setup_lib.check_config(c)
  return c


def sharded_steps(config, n_steps=1, seed=0):
  """Runs n_steps jitted, sharded train steps on fixed data; returns the metrics list."""
  model = model_lib.build(config, VOCAB)
  tx = optimizer.make(config)
  mesh = sharding_lib.make_mesh(config)
  rules = sharding_lib.rules(config)
  state_sh = state_lib.shardings(model, tx, mesh, rules)
  state = state_lib.create_sharded(model, tx, seed, state_sh)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                   lr_schedule=optimizer.schedule(config)),
                 in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding_lib.replicated(mesh)))
  window = np.asarray(tokens((config.train.batch_size, config.data.seq_len + 1), seed=7))
  out = []
  for _ in range(n_steps):
    state, metrics = step(state, jax.device_put(window, batch_sh))
    out.append(jax.device_get(metrics))
  return out


def split_gate(ids):
  """A latent-mixture gate class with fixed pi = 1/2 in which only tower 0 can produce the
  pieces `ids` (a list, read when the model runs) and only tower 1 the rest: a model whose
  towers split the vocabulary by construction (the known answer for the estimators)."""
  from twotower_jax.model import gates  # pylint: disable=g-import-not-at-top

  class SplitGate(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_NxBxLxH, decode, decode_towers, weights_BxL=None):
      del decode, weights_BxL
      tower_logits = decode_towers(gates.tower_heads(self.cfg, h_NxBxLxH))
      mine_V = jnp.zeros(self.cfg.vocab_size, bool).at[jnp.asarray(ids)].set(True)
      tower_logits = tower_logits.at[0].add(jnp.where(mine_V, 0.0, -1e4))
      tower_logits = tower_logits.at[1].add(jnp.where(mine_V, -1e4, 0.0))
      log_pi = jnp.full(h_NxBxLxH.shape[:3], -jnp.log(2.0))
      log_p = jax.nn.log_softmax(tower_logits.astype(jnp.float32), -1)
      return {'logits_BxLxV': jax.nn.logsumexp(log_pi[..., None] + log_p, axis=0),
              'tower_logits_NxBxLxV': tower_logits, 'gate_log_weights_NxBxL': log_pi}

  return SplitGate
