"""The two-tower LM: shared embeddings -> N stacked towers -> mixing gate.

The towers are one tower module vmapped along a leading `tower` axis with
independent initialisation, so N towers cost one definition and the tower axis
can be sharded across devices. Pure functions: `model.init` / `model.apply`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from twotower_jax import embeddings
from twotower_jax import gates
from twotower_jax import layers
from twotower_jax import sharding
from twotower_jax import towers


class TwoTowerLM(nn.Module):
  """Returns a dict: `logits_BxLxV`, `tower_states_NxBxLxH`, `aux_loss`, `metrics`, ..."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, deterministic: bool = True,
               states_fn: Callable[[jax.Array], jax.Array] | None = None):
    """`states_fn` (analysis hook) edits the tower states h_NxBxLxH before the gate."""
    cfg = self.cfg
    embedder = embeddings.Embedder(cfg, name='embed')
    x_NxBxLxH = embedder.encode(tokens_BxL)
    # Activations split by batch, not by the (FSDP-sharded) width of the token table.
    x_NxBxLxH = sharding.constrain(x_NxBxLxH, ('tower', 'batch', 'length', None))
    stacked = nn.vmap(towers.get(cfg.tower_type).module,
                      in_axes=0, out_axes=0, axis_size=cfg.n_towers,
                      variable_axes={'params': 0, 'intermediates': 0},
                      split_rngs={'params': True, 'dropout': True},
                      metadata_params={nn.PARTITION_NAME: 'tower'})
    tower_stack = stacked(cfg, deterministic, name='towers')
    gate = gates.get(cfg.gate)(cfg, deterministic, name='gate')

    def forward(x_NxBxLxH):
      h_NxBxLxH = tower_stack(x_NxBxLxH)
      if states_fn is not None:
        h_NxBxLxH = states_fn(h_NxBxLxH)
      out = dict(gate(h_NxBxLxH, embedder.decode, embedder.decode_towers))
      out['tower_states_NxBxLxH'] = h_NxBxLxH
      return out

    out = forward(x_NxBxLxH)
    # Pondering: each extra pass adds the expected token embedding under the current
    # prediction to the inputs; the towers and gate are reused (same parameters).
    for _ in range(cfg.ponder_steps):
      probs_BxLxV = jax.nn.softmax(out['logits_BxLxV'].astype(jnp.float32) /
                                   cfg.ponder_temperature, axis=-1)
      x_NxBxLxH = x_NxBxLxH + embedder.soft_embed(probs_BxLxV)
      out = forward(x_NxBxLxH)
    out.setdefault('aux_loss', jnp.zeros((), jnp.float32))
    out.setdefault('metrics', {})
    return out


def build(config: ml_collections.ConfigDict, vocab_size: int) -> TwoTowerLM:
  return TwoTowerLM(layers.ModelConfig.from_config(config, vocab_size))


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
