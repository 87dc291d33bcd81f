"""Non-finite loss or gradients: cheap flags computed inside the jitted step.

The step returns one bool for the loss and one per gradient leaf; the train loop
reads them with the metrics and either stops (naming the step and the first
offending quantity, the bad state never saved) or, with train.on_nonfinite=skip,
the step itself keeps the old params and optimizer state and counts the skip.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax import errors

MODES = ('stop', 'skip')
FLAGS_KEY = 'finite_flags'  # bool[1 + n_grad_leaves]: [loss, *grads], in tree order


class NonFiniteError(errors.UserError):
  """Training produced NaN/inf; the message names the step and the quantity."""


def flags(loss: jax.Array, grads: Any) -> tuple[jax.Array, jax.Array]:
  """(all finite, per-quantity finite flags [loss, *grad leaves])."""
  per_leaf = [jnp.all(jnp.isfinite(loss))]
  per_leaf += [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
  flags_Q = jnp.stack(per_leaf)
  return jnp.all(flags_Q), flags_Q


def keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where ok, else `old`, leaf by leaf (a skipped update)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def quantity_names(params: Any) -> list[str]:
  """Names matching FLAGS_KEY entries: 'loss', then 'gradient of params<path>'."""
  return ['loss'] + [f'gradient of params{jax.tree_util.keystr(p)}'
                     for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def first_offender(flags_Q: np.ndarray, names: Sequence[str]) -> str | None:
  """The first non-finite quantity (the loss before any gradient), or None."""
  bad = np.flatnonzero(~np.asarray(flags_Q, bool))
  return names[bad[0]] if bad.size else None
