"""Non-finite loss, gradients or updated state: cheap flags computed inside the jitted step.

The step returns one bool for the loss, one per gradient leaf, one per updated
parameter leaf and one for the updated optimizer state (a NaN learning rate or
b1 = 1 gives NaN parameters from a finite loss and finite gradients). The train loop
reads them with the metrics and either stops (naming the step and the first
offending quantity, the bad state never saved) or, with train.on_nonfinite=skip,
the step itself keeps the old params and optimizer state and counts the skip; a run
of train.max_consecutive_skips skipped updates in a row stops the run.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax import errors

MODES = ('stop', 'skip')
# bool[1 + 2 * n_param_leaves + 1]: [loss, *grads, *updated params, optimizer state].
FLAGS_KEY = 'finite_flags'


class NonFiniteError(errors.UserError):
  """Training produced NaN/inf; the message names the step and the quantity."""


def _all_finite(x: jax.Array) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.ones((), bool)  # integer leaves (step counters) cannot be NaN
  return jnp.all(jnp.isfinite(x))


def tree_finite(tree: Any) -> jax.Array:
  """One bool: every float leaf of `tree` is finite."""
  leaves = [_all_finite(x) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def flags(loss: jax.Array, grads: Any, params: Any = None,
          opt_state: Any = None) -> tuple[jax.Array, jax.Array]:
  """(all finite, per-quantity flags [loss, *grads, *params, opt_state]).

  `params` and `opt_state` are the updated ones; left out, only loss and gradients.
  """
  per_leaf = [_all_finite(loss)] + [_all_finite(g) for g in jax.tree.leaves(grads)]
  if params is not None:
    per_leaf += [_all_finite(p) for p in jax.tree.leaves(params)]
    per_leaf.append(tree_finite(opt_state))
  flags_Q = jnp.stack(per_leaf)
  return jnp.all(flags_Q), flags_Q


def keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where ok, else `old`, leaf by leaf (a skipped update)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def quantity_names(params: Any, updated: bool = True) -> list[str]:
  """Names matching FLAGS_KEY entries: 'loss', 'gradient of params<path>', then (updated)
  'updated params<path>' and 'updated optimizer state'."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  names = ['loss'] + [f'gradient of params{p}' for p in paths]
  if updated:
    names += [f'updated params{p}' for p in paths] + ['updated optimizer state']
  return names


def first_offender(flags_Q: np.ndarray, names: Sequence[str]) -> str | None:
  """The first non-finite quantity (the loss before any gradient), or None."""
  bad = np.flatnonzero(~np.asarray(flags_Q, bool))
  return names[bad[0]] if bad.size else None


def skip_streak(skipped_S: Sequence[float], streak: int, limit: int) -> tuple[int, int | None]:
  """(streak after these steps, index of the step where it reached `limit` or None).

  `skipped_S` holds each step's skipped flag in order; `streak` is the run of skipped
  steps just before them.
  """
  for i, s in enumerate(skipped_S):
    streak = streak + 1 if s else 0
    if streak >= limit:
      return streak, i
  return streak, None
