"""Orbax checkpoints of a run: train state, data iterator position and metadata.

Layout: DIR/checkpoints/<step>/{state,data,meta}, DIR local or gs://. Saves are
asynchronous; Orbax finalises a step only when every item is written (locally it writes
`<step>.orbax-checkpoint-tmp` and renames it; on Cloud Storage it writes the step in
place and adds a commit file last), so an interrupted save is never restored. Which
steps are finished is asked of Orbax (`is_complete`), and leftover unfinished saves are
removed when a manager opens the directory for writing. On top of that every checkpoint
carries a fingerprint of each state leaf, checked on restore, because Orbax itself
restores a bit-flipped data file without complaint.

`Saver` is how the train loop saves: it refuses state that is not finite (so rotation
never replaces a good checkpoint by a NaN one) and turns a failed write, which Orbax
reports only at the next save or wait, into one CheckpointError naming the step
directory and the cause (free space when the disk is full).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable

from etils import epath
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from twotower_jax import errors
from twotower_jax import paths

log = logging.getLogger('twotower_jax')

ITEMS = ('state', 'data', 'meta')  # the items of every step
# TensorStore status codes and messages that mean unreadable bytes, not a model mismatch.
_DAMAGE_RE = re.compile(r'OUT_OF_RANGE|DATA_LOSS|Error reading|Error opening|NOT_FOUND|'
                        r'Unterminated|Expecting|was not found in the checkpoint|'
                        r'error while reading')
# Where TensorStore appends a repr of its spec or a bound method to a message.
_REPR_RE = re.compile(r'\s*(See full TensorStore details|<bound method|<[\w.]+ object at 0x).*',
                      re.S)
_OS_ERROR_RE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


class CheckpointError(errors.UserError):
  """A checkpoint that is missing, damaged or does not fit the model, or a failed save."""


class CheckpointVanished(CheckpointError):
  """The step directory was removed while it was read (rotation by a training run)."""


def directory(workdir: str) -> str:
  return paths.join(workdir, 'checkpoints')


def remove_interrupted_saves(workdir: str) -> list[str]:
  """Deletes the tmp dirs of saves that never finished (a writing run, process 0 only).

  Orbax also does this, but in a background thread it waits for only at the next
  save; doing it here first leaves the workdir settled when a run resumes.
  """
  root = directory(workdir)
  if jax.process_index() != 0 or not paths.isdir(root):
    return []
  removed = [paths.join(root, n) for n in paths.listdir(root)
             if ocp.step.is_path_temporary(epath.Path(paths.join(root, n)))]
  for path in removed:
    log.warning('removing the unfinished save %s', path)
    paths.rmtree(path)
  return removed


# What Orbax writes into a step directory (its commit file and our items); a folder named
# by a number that holds none of them is not a checkpoint, and no save left it.
_ORBAX_ENTRIES = frozenset(('_CHECKPOINT_METADATA', 'state', 'data', 'meta',
                           'commit_success.txt'))


def refuse_foreign_folders(workdir: str) -> None:
  """CheckpointError when DIR/checkpoints holds a folder named by a step number that is not
  a checkpoint (e.g. some command's output): Orbax would take it for one, rotation or
  resuming would delete it, so it is never touched; the user moves it out."""
  root = directory(workdir)
  if jax.process_index() != 0 or not paths.isdir(root):
    return
  for name in sorted(paths.listdir(root)):
    folder = paths.join(root, name)
    if name.isdigit() and paths.isdir(folder):
      entries = set(paths.listdir(folder))
      if entries and not entries & _ORBAX_ENTRIES:
        raise CheckpointError(
            f'{folder} is not a checkpoint (it holds {", ".join(sorted(entries)[:3])}), but a '
            'folder named by a number there is taken for one and deleted when the run resumes '
            f'or rotates its checkpoints; move it out of {root} and rerun')


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """A writing manager (keeps `keep` steps, async saves) or a reading one."""
  if not read_only:
    refuse_foreign_folders(workdir)
    remove_interrupted_saves(workdir)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=not read_only, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  # Orbax warns that a reading manager reads; nothing a user can act on.
  with _absl_quiet() if read_only else contextlib.nullcontext():
    return ocp.CheckpointManager(
        directory(workdir), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})


@contextlib.contextmanager
def _absl_quiet():
  """Orbax's absl log records below ERROR dropped for the block (its known notices)."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def complete_steps(workdir: str) -> list[int]:
  """The committed steps in DIR/checkpoints, read from the directory (no manager needed)."""
  root = directory(workdir)
  if not paths.isdir(root):
    return []
  return sorted(int(n) for n in paths.listdir(root)
                if n.isdigit() and is_complete(paths.join(root, n)))


def is_complete(step_dir: str) -> bool:
  """True when Orbax finished the step, asked of Orbax: finalised by its rule for this
  storage (renamed locally, commit file on Cloud Storage), its step metadata recording the
  commit, and each of our items among that metadata's items. An item deleted after the
  commit makes the step damaged, not incomplete: restore says so, and nothing deletes it."""
  path = epath.Path(step_dir)
  if not path.exists() or not ocp.step.is_path_finalized(path):
    return False
  try:
    with _absl_quiet():  # Orbax warns of a missing metadata file: here an answer, not a fault
      step_meta = ocp.metadata.get_step_metadata(path)
  except ValueError:  # missing or unreadable: Orbax never finished the step
    return False
  handlers = step_meta.item_handlers
  return (step_meta.commit_timestamp_nsecs is not None and isinstance(handlers, dict)
          and all(item in handlers for item in ITEMS))


def latest_complete_step(mngr: ocp.CheckpointManager, remove_incomplete: bool = False
                         ) -> int | None:
  """The newest committed step; step dirs without Orbax's commit files are never chosen.

  With remove_incomplete (a writing run), such dirs above the chosen step are deleted so
  the resumed run can save those steps again.
  """
  found, removed = None, False
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = paths.join(str(mngr.directory), str(step))
    if is_complete(step_dir):
      found = step
      break
    if remove_incomplete and jax.process_index() == 0:
      log.warning('removing incomplete checkpoint %s: it lacks the commit files of a finished '
                  'save (interrupted while saving, or parts deleted); its steps are trained '
                  'again', step_dir)
      paths.rmtree(step_dir)
      removed = True
    else:
      log.warning('ignoring incomplete checkpoint %s (it lacks the commit files of a finished '
                  'save)', step_dir)
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


@jax.jit
def _finite_flags(tree: Any) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.ones((), bool)
          for x in jax.tree.leaves(tree)]


def first_nonfinite_leaf(tree: Any) -> str | None:
  """The path of the first leaf holding NaN or inf, or None when every leaf is finite."""
  for path, ok in zip(leaf_paths(tree), jax.device_get(_finite_flags(tree))):
    if not ok:
      return path
  return None


def leaf_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         meta: dict[str, Any]) -> None:
  """Starts an asynchronous save (returns before the files are written).

  State with a NaN or inf leaf is never written: a CheckpointError names the leaf.
  """
  bad = first_nonfinite_leaf(state)
  if bad is not None:
    raise CheckpointError(
        f'step {step}: state{bad} is not finite (NaN or inf); refusing to save it over the '
        'last good checkpoint; lower optimizer.lr or resume from that checkpoint')
  meta = dict(meta, fingerprints=fingerprints(state))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)), force=True)


def _os_error(e: BaseException) -> tuple[int | None, str]:
  """(errno, description) of a failed write, looking through Orbax's and TensorStore's
  wrapping (`os_error_code='28'` in a ValueError, or an OSError in the cause chain)."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return seen.errno, os.strerror(seen.errno)
    match = _OS_ERROR_RE.search(str(seen))
    if match:
      code = int(match.group(1) or match.group(2))
      return code, os.strerror(code)
    seen = seen.__cause__ or seen.__context__
  return None, f'{type(e).__name__}: {_first_line(e)}'


class Saver:
  """The train loop's saves: each started asynchronously; a failure, whenever Orbax reports
  it (the save call, the next save, or the final wait), stops the run with one line."""

  def __init__(self, mngr: ocp.CheckpointManager, workdir: str, state_bytes: int = 0):
    self.mngr = mngr
    self.workdir = workdir
    self.state_bytes = state_bytes  # for the message on a full disk
    self.in_flight: int | None = None  # the step whose save is not yet known to be done

  def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any]) -> None:
    self.wait()  # the previous save's failure surfaces here, named, not inside Orbax
    try:
      save(self.mngr, step, state, data_iter, meta)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Orbax / TensorStore / OS
      raise self._failed(step, e) from None
    self.in_flight = step

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises CheckpointError if it failed."""
    step, self.in_flight = self.in_flight, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from None

  def latest(self) -> int | None:
    steps = complete_steps(self.workdir)
    return steps[-1] if steps else None

  def close(self) -> None:
    self.wait()
    self.mngr.close()

  def abandon(self) -> None:
    """Closes the manager after a failure, keeping the first error (Orbax repeats it)."""
    try:
      self.mngr.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def _failed(self, step: int | None, e: BaseException) -> CheckpointError:
    where = paths.join(directory(self.workdir), str(step)) if step is not None else (
        directory(self.workdir))
    code, what = _os_error(e)
    self.abandon()  # the partial save's tmp dir is removed when the run is resumed
    last = self.latest()
    detail = what
    if code in (errno.ENOSPC, errno.EDQUOT) and not paths.is_remote(self.workdir):
      free = shutil.disk_usage(directory(self.workdir)).free
      detail += f'; {free / 2**20:.1f} MiB free there'
      if self.state_bytes:
        detail += f', a checkpoint takes about {self.state_bytes / 2**20:.1f} MiB'
      fix = 'free space (or lower train.keep_checkpoints)'
    else:
      fix = 'fix the cause'
    return CheckpointError(
        f'saving checkpoint {where} failed ({detail}); training stopped, earlier checkpoints '
        f'are intact: {fix} and rerun the same command to resume from '
        f'{"the start" if last is None else f"step {last}"}')


def _first_line(e: BaseException) -> str:
  """The message's first line without TensorStore's spec repr, at most 300 characters."""
  text = _REPR_RE.sub('', str(e)).strip()
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
            data_iter: Any | None = None,
            legacy: tuple[Any, Callable[[Any], Any]] | None = None) -> tuple[Any, dict[str, Any]]:
  """State restored onto the shardings in `abstract_state`; data_iter positioned in place.

  Any mismatch (shape, tree structure, unreadable or corrupted file) is a CheckpointError;
  Orbax refuses a target tree whose structure differs, so nothing restores partially.
  `legacy` (target, convert): an older layout of the same state, tried when the current
  one does not restore; the state read in it is returned converted.
  """
  where = paths.join(str(mngr.directory), str(step))
  try:
    return _restore(mngr, step, abstract_state, data_iter)
  except CheckpointError as e:
    if legacy is None or isinstance(e, CheckpointVanished):
      raise
    try:
      state, meta = _restore(mngr, step, legacy[0], data_iter)
    except CheckpointError:
      raise e from None  # not the older layout either: the first error says why
    log.info('checkpoint %s has an earlier optimizer layout; converted on restore', where)
    return legacy[1](state), meta


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
             data_iter: Any | None) -> tuple[Any, dict[str, Any]]:
  where = paths.join(str(mngr.directory), str(step))
  items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  was_complete = is_complete(where)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    if was_complete and _being_deleted(where):
      raise CheckpointVanished(
          f'checkpoint {where} was deleted while it was read (a training run on this workdir '
          'keeps only its newest train.keep_checkpoints); read it again, or pick a step that '
          'is kept') from None
    raise _restore_error(where, e) from None
  _check_fingerprints(restored['state'], restored['meta'], where)
  return restored['state'], restored['meta']


def _being_deleted(step_dir: str, wait_s: float = 1.0) -> bool:
  """True once a step directory that was complete is gone or no longer complete (a training
  run's rotation deletes it file by file); a damaged one stays, so this waits a little."""
  deadline = time.monotonic() + wait_s
  while True:
    if not is_complete(step_dir):
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.1)


def _restore_error(where: str, e: BaseException) -> CheckpointError:
  """A model mismatch (shape, tree) or damage (anything TensorStore or JSON cannot read)."""
  if isinstance(e, (ValueError, KeyError, TypeError)):
    if not isinstance(e, json.JSONDecodeError) and not _DAMAGE_RE.search(str(e)):
      return CheckpointError(
          f'checkpoint {where} does not restore onto this model ({_first_line(e)}); use the '
          'config it was written with or a new workdir')
  return _damaged(where, e)
