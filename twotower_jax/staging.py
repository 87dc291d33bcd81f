"""Output folders replaced all at once: a staging folder beside the target, renamed into
place when its writer finishes (the analysis's DIR/analysis, --compare's and generate's
folders, or --out), and where such a folder may be (`refusal`). A gs:// target is staged in
a local folder and uploaded when its writer finishes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator, Sequence

from twotower_jax import paths
from twotower_jax import workdir as workdir_lib

# A folder holding one of these is a run's workdir (its config, tokenizer or lock).
_RUN_FILES = (workdir_lib.CONFIG_JSON, workdir_lib.TOKENIZER, workdir_lib.LOCK)


@contextlib.contextmanager
def staged_dir(final: str, keep: Sequence[str] = ()) -> Iterator[str]:
  """A new folder beside `final`, renamed into its place when the block completes.

  `final` then holds what the block wrote, plus the `keep` entries it held before
  (folders or files, e.g. the probe/ cache or another mode's outputs, carried over as
  hard links). A failure leaves `final` as it was; a kill leaves it as it was or, between
  the two renames, absent: never the files of two runs side by side. Leftover staging
  folders of dead processes are removed. Raises OSError when the folder cannot be written.
  For a gs:// `final` the block writes a local folder, uploaded in place of `final`'s files
  when it completes (a kill during the upload leaves them partial: rerun the command).
  """
  if paths.is_remote(final):
    yield from _staged_remote(paths.absolute(final), keep)
    return
  final = os.path.abspath(final)
  parent, name = os.path.split(final)
  if os.path.exists(final) and not os.path.isdir(final):
    raise OSError(errno.ENOTDIR, f'{final} is a file, not a directory')
  os.makedirs(parent, exist_ok=True)
  _remove_dead_stagings(parent, name)
  staging = os.path.join(parent, f'.{name}.tmp-{os.getpid()}')
  os.mkdir(staging)
  try:
    for entry in keep:
      src, dst = os.path.join(final, entry), os.path.join(staging, entry)
      if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=_link_or_copy)
      elif os.path.isfile(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _link_or_copy(src, dst)
    yield staging
    old = os.path.join(parent, f'.{name}.old-{os.getpid()}')
    if os.path.exists(final):
      os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _staged_remote(final: str, keep: Sequence[str]) -> Iterator[str]:
  with paths.local_dir() as local:
    staging = os.path.join(local, final.rsplit('/', 1)[-1])
    os.mkdir(staging)
    for entry in keep:
      if paths.isdir(paths.join(final, entry)):
        paths.copy_tree(paths.join(final, entry), os.path.join(staging, entry))
    yield staging
    paths.rmtree(final)
    paths.copy_tree(staging, final)


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def _remove_dead_stagings(parent: str, name: str) -> None:
  """Deletes `.NAME.tmp-PID` / `.NAME.old-PID` folders whose process no longer runs."""
  for entry in os.listdir(parent):
    for kind in ('tmp', 'old'):
      prefix = f'.{name}.{kind}-'
      pid = entry[len(prefix):]
      if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def is_run_dir(folder: str) -> bool:
  """Whether `folder` is a run's workdir (it holds a config.json, tokenizer or train.lock)."""
  return any(os.path.exists(os.path.join(folder, name)) for name in _RUN_FILES)


def refusal(final: str, what: str, markers: Sequence[str] | None = None,
            reads: Sequence[str] = (), flag: str = '--out') -> str | None:
  """Why `final` may not be the output folder of `what` (which replaces it whole), or None.

  Refused: a file; a folder inside a run's checkpoints/ (a training run takes a folder
  named by a number there for a checkpoint, and deletes one it cannot read); a run
  directory or a folder holding one of `reads` (the workdirs the command reads); with
  `markers`, a non-empty folder holding none of them (not an earlier output of `what`).
  """
  final = os.path.abspath(final)
  where = f'{flag}={final}'
  if os.path.exists(final) and not os.path.isdir(final):
    return (f'{where} is a file, not a directory; give a folder for the {what} (a new one, '
            'or one it wrote before)')
  ckpt = _checkpoints_above(final, reads)
  if ckpt:
    return (f'{where} is inside {ckpt}, where a training run takes each folder for a checkpoint '
            f'and deletes one it cannot read; give a folder outside {workdir_lib.CHECKPOINTS}/')
  if is_run_dir(final) or any((os.path.abspath(r) + os.sep).startswith(final + os.sep)
                              for r in reads):
    return (f'{where} is a run directory or holds one; the {what} replaces its output folder '
            'whole, so give a folder of its own')
  if markers is not None and os.path.isdir(final) and os.listdir(final) and not any(
      os.path.exists(os.path.join(final, m)) for m in markers):
    return (f'{where} holds files that are not an earlier {what}; the {what} replaces its '
            'output folder whole, so give a new or empty folder')
  return None


def _checkpoints_above(final: str, reads: Sequence[str]) -> str | None:
  """The checkpoints/ folder of a run (one of `reads`, or any workdir) holding `final`."""
  for run in reads:
    ckpt = workdir_lib.path(run, workdir_lib.CHECKPOINTS)
    if (final + os.sep).startswith(ckpt + os.sep):
      return ckpt
  folder = final
  while os.path.dirname(folder) != folder:
    parent = os.path.dirname(folder)
    if os.path.basename(folder) == workdir_lib.CHECKPOINTS and is_run_dir(parent):
      return folder
    folder = parent
  return None
