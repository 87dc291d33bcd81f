"""AdamW with global-norm clipping and a linear warm-up then linear decay to zero.

Weight decay applies to weight matrices and embedding tables, not to biases or
LayerNorm parameters. `train.trainable` (a regex over '/'-joined parameter paths)
freezes every parameter it does not match: optax.multi_transform gives them
optax.set_to_zero (no update, no weight decay, no AdamW moments, and no part in the
clipping norm), so they stay bit-identical. With '' (every parameter trains) the
optimizer is exactly the plain chain, so its state restores from any earlier checkpoint;
`legacy` reads a train.trainable checkpoint written before the freeze was multi_transform.
"""

from __future__ import annotations

import re

import jax
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


def _partition(pattern: str, trained: optax.GradientTransformation
               ) -> optax.GradientTransformation:
  """`trained` on the leaves `pattern` selects, zero updates (and no state) on the others."""
  def labels(params):
    return jax.tree.map(lambda t: 'trained' if t else 'frozen', trainable_mask(params, pattern))
  return optax.multi_transform({'trained': trained, 'frozen': optax.set_to_zero()}, labels)


def zero_frozen(grads, pattern: str):
  """`grads` with the leaves `pattern` does not select replaced by zeros ('' = unchanged)."""
  if not pattern:
    return grads
  freeze = _partition(pattern, optax.identity())
  return freeze.update(grads, freeze.init(grads))[0]


def check_trainable(pattern: str, params) -> None:
  """A train.trainable that selects no parameter is a mistake, not a run that learns nothing."""
  if not pattern:
    return
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if not any(selects(pattern, p) for p in paths):
    examples = sorted({p.split('/')[0]: p for p in reversed(paths)}.values())  # one per group
    raise errors.UserError(f'train.trainable={pattern!r} selects no parameter of this model; '
                           f'its paths look like {", ".join(examples)}, ...')


def _clip_adamw(config: ml_collections.ConfigDict, *first) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(*first, optax.clip_by_global_norm(opt.clip_norm),
                     optax.adamw(schedule(config), b1=opt.b1, b2=opt.b2, eps=1e-8,
                                 weight_decay=opt.weight_decay, mask=decay_mask))


def make(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clipped AdamW; with train.trainable only on the parameters it selects."""
  pattern = config.train.get('trainable', '')
  return _partition(pattern, _clip_adamw(config)) if pattern else _clip_adamw(config)


def legacy(config: ml_collections.ConfigDict) -> optax.GradientTransformation | None:
  """The layout of a train.trainable checkpoint written up to 88fe442 (a stateless gradient
  mask, the clip, AdamW with moments for every leaf), only to restore one; None for ''."""
  if not config.train.get('trainable', ''):
    return None
  return _clip_adamw(config, optax.identity())


def from_legacy(opt_state, config: ml_collections.ConfigDict):
  """A `legacy(config)` state in make(config)'s layout: the clip and AdamW states go to the
  trained partition; the frozen leaves' moments, zeros (the mask zeroed their gradients),
  are dropped."""
  _, clip_state, (adam, *rest) = opt_state
  like = adam.mu  # a params-shaped tree
  trains = trainable_mask(like, config.train.trainable)

  def trained_only(tree):
    return jax.tree.map(lambda x, t: x if t else optax.MaskedNode(), tree, trains)

  adam = adam._replace(mu=trained_only(adam.mu), nu=trained_only(adam.nu))
  state = jax.eval_shape(make(config).init, like)  # the partition skeleton
  trained = state.inner_states['trained']._replace(inner_state=(clip_state, (adam, *rest)))
  return state._replace(inner_states={**state.inner_states, 'trained': trained})
