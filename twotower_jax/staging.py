"""Output folders replaced all at once: a staging folder beside the target, renamed into
place when its writer finishes (the analysis's DIR/analysis, or --out). A gs:// target is
staged in a local folder and uploaded when its writer finishes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator, Sequence

from twotower_jax import paths


@contextlib.contextmanager
def staged_dir(final: str, keep: Sequence[str] = ()) -> Iterator[str]:
  """A new folder beside `final`, renamed into its place when the block completes.

  `final` then holds what the block wrote, plus the `keep` entries it held before
  (caches such as probe/, carried over as hard links). A failure leaves `final` as it
  was; a kill leaves it as it was or, between the two renames, absent: never the files
  of two runs side by side. Leftover staging folders of dead processes are removed.
  Raises OSError when the folder cannot be written. For a gs:// `final` the block writes
  a local folder, uploaded in place of `final`'s files when it completes (a kill during
  the upload leaves them partial: rerun the command).
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
      src = os.path.join(final, entry)
      if os.path.isdir(src):
        shutil.copytree(src, os.path.join(staging, entry), copy_function=_link_or_copy)
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
