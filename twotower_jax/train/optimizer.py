"""AdamW with global-norm clipping and a linear warm-up then linear decay to zero.

Weight decay applies to weight matrices and embedding tables, not to biases or
LayerNorm parameters.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

_NO_DECAY = ('bias', 'scale', 'output_bias')


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt, steps = config.optimizer, config.train.steps
  warmup = min(opt.warmup_steps, steps)
  return optax.join_schedules([
      optax.linear_schedule(0.0, opt.lr, max(warmup, 1)),
      optax.linear_schedule(opt.lr, 0.0, max(steps - warmup, 1)),
  ], boundaries=[warmup])


def decay_mask(params):
  """True for leaves that get weight decay."""
  def keep(path, _):
    return getattr(path[-1], 'key', None) not in _NO_DECAY
  return jax.tree_util.tree_map_with_path(keep, params)


def make(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(schedule(config), b1=opt.b1, b2=opt.b2, eps=1e-8,
                  weight_decay=opt.weight_decay, mask=decay_mask))
