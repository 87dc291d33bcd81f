"""Orbax checkpoints of a run: train state, data iterator position and metadata.

Layout: DIR/checkpoints/<step>/{state,data,meta}. Saves are asynchronous; Orbax
commits a step only when every item is written, so an interrupted save is never
restored.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from twotower_jax import errors


class CheckpointError(errors.UserError):
  """A checkpoint that is missing, damaged or does not fit the model."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=not read_only, create=not read_only,
      read_only=read_only)
  return ocp.CheckpointManager(
      directory(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         meta: dict[str, Any]) -> None:
  """Starts an asynchronous save (returns before the files are written)."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any | None = None) -> tuple[Any, dict[str, Any]]:
  """State restored onto the shardings in `abstract_state`; data_iter positioned in place."""
  items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(
        f'checkpoint {os.path.join(mngr.directory, str(step))} does not restore onto this '
        f'model ({first[:300]}); use the config it was written with or a new workdir') from None
  return restored['state'], restored['meta']
