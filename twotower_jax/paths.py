"""Where a run's files live: a local folder or a Cloud Storage URL (gs://BUCKET/PATH).

Every workdir and prepared-data path goes through these functions. A local path keeps
its POSIX behaviour (made absolute; a file replaced atomically by rename after fsync);
a URL is read and written through etils.epath (gcsfs for gs://), where an object write
is atomic by itself and a folder is a name prefix, so there is nothing to rename.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from typing import IO, Iterator

from etils import epath
import fsspec

# gcsfs keeps every folder listing for the life of the process: files that other processes
# wrote later (another host's checkpoint shard, a training run read by the analysis), or
# TensorStore in this one, would stay unseen. Listings are read fresh.
for _protocol in ('gs', 'gcs'):
  fsspec.config.conf.setdefault(_protocol, {})['use_listings_cache'] = False


def is_remote(path: str) -> bool:
  """True for a URL such as gs://bucket/run (read and written through epath)."""
  return '://' in str(path)


def absolute(path: str) -> str:
  """An absolute local path, or the URL without a trailing slash."""
  path = str(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def join(base: str, *names: str) -> str:
  """`base`/name/...: os.path.join for local paths, '/' for URLs."""
  base = absolute(base)
  return '/'.join([base, *names]) if is_remote(base) else os.path.join(base, *names)


def exists(path: str) -> bool:
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names in a folder (for a URL: under its prefix), sorted."""
  if is_remote(path):
    return sorted(p.name for p in epath.Path(path).iterdir())
  return sorted(os.listdir(path))


def makedirs(path: str) -> None:
  """Creates a local folder and its parents; a URL's prefix needs no creating."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if is_remote(path):
    epath.Path(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Removes a folder and everything in it; no error when it is already gone."""
  if is_remote(path):
    with contextlib.suppress(FileNotFoundError):
      epath.Path(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def open_file(path: str, mode: str = 'r', **kwargs) -> IO:
  """open() for a local path; for a URL epath's open, or (text read: UTF-8, `newline` as
  open() takes it) the object's text in memory."""
  if not is_remote(path):
    return open(path, mode, **kwargs)  # pylint: disable=unspecified-encoding
  if mode in ('r', 'rt'):
    return io.StringIO(read_bytes(path).decode('utf-8'), newline=kwargs.get('newline'))
  return epath.Path(path).open(mode)


def read_bytes(path: str) -> bytes:
  with open_file(path, 'rb') as f:
    return f.read()


def write_atomic(path: str, data: bytes | str) -> None:
  """Replaces `path` whole: a kill leaves the old file or the new, never a part.

  Locally written beside the target, synced and renamed over it; a Cloud Storage
  object is replaced atomically by the upload itself.
  """
  raw = data.encode('utf-8') if isinstance(data, str) else data
  if is_remote(path):
    epath.Path(path).write_bytes(raw)
    return
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(raw)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def copy_tree(src: str, dst: str) -> None:
  """Copies the files under folder `src` into `dst` (either side local or a URL)."""
  makedirs(dst)
  for name in listdir(src):
    s, d = join(src, name), join(dst, name)
    if isdir(s):
      copy_tree(s, d)
    else:
      with open_file(s, 'rb') as fin, open_file(d, 'wb') as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


@contextlib.contextmanager
def local_dir(prefix: str = 'twotower-') -> Iterator[str]:
  """A temporary local folder, removed afterwards (where a URL's files are staged)."""
  with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
    yield tmp
