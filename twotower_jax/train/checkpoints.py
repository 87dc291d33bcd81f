"""Orbax checkpoints of a run: train state, data iterator position and metadata.

Layout: DIR/checkpoints/<step>/{state,data,meta}. Saves are asynchronous; Orbax
writes a step into `<step>.orbax-checkpoint-tmp` and renames it only when every item
is written, so an interrupted save is never restored (leftover tmp dirs are removed
when a manager opens the directory for writing). On top of that every checkpoint
carries a fingerprint of each state leaf, checked on restore, because Orbax itself
restores a bit-flipped data file without complaint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from twotower_jax import errors

log = logging.getLogger('twotower_jax')

# Files Orbax writes into a step directory before committing it by rename.
_COMMITTED_MARKERS = ('_CHECKPOINT_METADATA',)
_TMP_MARKER = '.orbax-checkpoint-tmp'  # in the name of a save Orbax has not finalized
# TensorStore status codes and messages that mean unreadable bytes, not a model mismatch.
_DAMAGE_RE = re.compile(r'OUT_OF_RANGE|DATA_LOSS|Error reading|Error opening|NOT_FOUND|'
                        r'Unterminated|Expecting')


class CheckpointError(errors.UserError):
  """A checkpoint that is missing, damaged or does not fit the model."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def remove_interrupted_saves(workdir: str) -> list[str]:
  """Deletes the tmp dirs of saves that never finished (a writing run, process 0 only).

  Orbax also does this, but in a background thread it waits for only at the next
  save; doing it here first leaves the workdir settled when a run resumes.
  """
  root = directory(workdir)
  if jax.process_index() != 0 or not os.path.isdir(root):
    return []
  removed = [os.path.join(root, n) for n in sorted(os.listdir(root)) if _TMP_MARKER in n]
  for path in removed:
    log.warning('removing the unfinished save %s', path)
    shutil.rmtree(path, ignore_errors=True)
  return removed


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """A writing manager (keeps `keep` steps, async saves) or a reading one."""
  if not read_only:
    remove_interrupted_saves(workdir)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=not read_only, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  if read_only:  # Orbax warns that a reading manager reads; nothing a user can act on
    absl_logger.setLevel(logging.ERROR)
  try:
    return ocp.CheckpointManager(
        directory(workdir), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
  finally:
    absl_logger.setLevel(level)


def is_complete(step_dir: str) -> bool:
  """True when Orbax finished the step: its metadata file and every item's are there."""
  if not all(os.path.isfile(os.path.join(step_dir, m)) for m in _COMMITTED_MARKERS):
    return False
  state = os.path.join(step_dir, 'state')
  return os.path.isfile(os.path.join(state, '_METADATA')) and os.path.isdir(
      os.path.join(step_dir, 'meta'))


def latest_complete_step(mngr: ocp.CheckpointManager, remove_incomplete: bool = False
                         ) -> int | None:
  """The newest committed step; step dirs without Orbax's commit files are never chosen.

  With remove_incomplete (a writing run), such dirs above the chosen step are deleted so
  the resumed run can save those steps again.
  """
  found, removed = None, False
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = os.path.join(str(mngr.directory), str(step))
    if is_complete(step_dir):
      found = step
      break
    log.warning('ignoring incomplete checkpoint %s', step_dir)
    if remove_incomplete and jax.process_index() == 0:
      shutil.rmtree(step_dir, ignore_errors=True)
      removed = True
  if removed:
    mngr.reload()  # forget the removed steps so they can be saved again
  return found


@jax.jit
def _fingerprints(tree: Any) -> list[jax.Array]:
  """A uint32 per leaf: position-weighted sum of its bits, exact in any reduction order."""
  out = []
  for leaf in jax.tree.leaves(tree):
    x = jnp.ravel(leaf)
    if x.dtype.itemsize != 4:
      x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
  return out


def fingerprints(tree: Any) -> list[int]:
  return [int(v) for v in jax.device_get(_fingerprints(tree))]


def leaf_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         meta: dict[str, Any]) -> None:
  """Starts an asynchronous save (returns before the files are written)."""
  meta = dict(meta, fingerprints=fingerprints(state))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)), force=True)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _damaged(where: str, e: BaseException) -> CheckpointError:
  return CheckpointError(
      f'checkpoint {where} cannot be read ({type(e).__name__}: {_first_line(e)}); it is '
      'damaged: delete that step directory to resume from an earlier one, or use a new workdir')


def _check_fingerprints(state: Any, meta: dict[str, Any], where: str) -> None:
  expected = meta.get('fingerprints')
  if expected is None:  # written before fingerprints existed
    return
  got = fingerprints(state)
  for path, a, b in zip(leaf_paths(state), expected, got):
    if a != b:
      raise CheckpointError(
          f'checkpoint {where} is corrupted: state{path} does not match the fingerprint saved '
          'with it; delete that step directory to resume from an earlier one, or use a new workdir')


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any | None = None) -> tuple[Any, dict[str, Any]]:
  """State restored onto the shardings in `abstract_state`; data_iter positioned in place.

  Any mismatch (shape, tree structure, unreadable or corrupted file) is a CheckpointError;
  Orbax refuses a target tree whose structure differs, so nothing restores partially.
  """
  where = os.path.join(str(mngr.directory), str(step))
  items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    if not isinstance(e, json.JSONDecodeError) and not _DAMAGE_RE.search(str(e)):
      raise CheckpointError(
          f'checkpoint {where} does not restore onto this model ({_first_line(e)}); use the '
          'config it was written with or a new workdir') from None
    raise _damaged(where, e) from None
  except Exception as e:  # pylint: disable=broad-except  # tensorstore read errors
    raise _damaged(where, e) from None
  _check_fingerprints(restored['state'], restored['meta'], where)
  return restored['state'], restored['meta']
