"""AdamW with global-norm clipping and a linear warm-up then linear decay to zero.

Weight decay applies to weight matrices and embedding tables, not to biases or
LayerNorm parameters. `train.trainable` (a regex over '/'-joined parameter paths)
freezes every parameter it does not match: their gradients are zeroed before clipping
and they get no weight decay, so they stay bit-identical. With '' (every parameter
trains) the optimizer is exactly the plain chain, so its state restores from any
earlier checkpoint.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from twotower_jax import errors

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


def param_path(path) -> str:
  """A tree path as train.trainable matches it: 'towers/blocks/qkv/kernel'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def trainable_mask(params, pattern: str):
  """True for the leaves whose path matches `pattern` ('' = every leaf)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: selects(pattern, param_path(path)),
                                         params)


def selects(pattern: str, path: str) -> bool:
  """Whether train.trainable=`pattern` trains the parameter at `path` ('' = all)."""
  return not pattern or re.search(pattern, path) is not None


def zero_frozen(grads, pattern: str):
  """`grads` with the leaves `pattern` does not select replaced by zeros ('' = unchanged)."""
  if not pattern:
    return grads
  return jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads,
                      trainable_mask(grads, pattern))


def check_trainable(pattern: str, params) -> None:
  """A train.trainable that selects no parameter is a mistake, not a run that learns nothing."""
  if not pattern:
    return
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if not any(selects(pattern, p) for p in paths):
    examples = sorted({p.split('/')[0]: p for p in reversed(paths)}.values())  # one per group
    raise errors.UserError(f'train.trainable={pattern!r} selects no parameter of this model; '
                           f'its paths look like {", ".join(examples)}, ...')


def make(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  pattern = config.train.get('trainable', '')
  if not pattern:
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(schedule(config), b1=opt.b1, b2=opt.b2, eps=1e-8,
                    weight_decay=opt.weight_decay, mask=decay_mask))

  def decayed(params):
    return jax.tree.map(lambda d, t: d and t, decay_mask(params), trainable_mask(params, pattern))

  return optax.chain(
      optax.stateless(lambda grads, params: zero_frozen(grads, pattern)),
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(schedule(config), b1=opt.b1, b2=opt.b2, eps=1e-8,
                  weight_decay=opt.weight_decay, mask=decayed))
