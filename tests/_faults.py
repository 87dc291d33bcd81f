"""Real faults for the reliability tests: a read-only directory and a small full filesystem.

A read-only directory is `chmod a-w` for an ordinary user; root ignores permissions, so as
root it is a read-only bind mount of the directory onto itself. A tiny tmpfs needs root.
Where neither works the test is skipped, never faked.
"""

import contextlib
import os
import subprocess

import pytest


def _mount(*args: str) -> bool:
  return subprocess.run(['mount', *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: str):
  """`path` (a directory) cannot be written to inside the block."""
  path = str(path)
  if os.geteuid() != 0:
    modes = {}
    for root, dirs, files in os.walk(path):
      for name in [root] + [os.path.join(root, f) for f in dirs + files]:
        modes[name] = os.stat(name).st_mode
        os.chmod(name, modes[name] & ~0o222)
    try:
      yield
    finally:
      for name, mode in modes.items():
        os.chmod(name, mode)
    return
  if not (_mount('--bind', path, path) and _mount('-o', 'remount,bind,ro', path)):
    subprocess.run(['umount', path], capture_output=True)
    pytest.skip('running as root without permission to mount: cannot make a read-only dir')
  try:
    yield
  finally:
    subprocess.run(['umount', path], check=True)


@contextlib.contextmanager
def small_filesystem(path: str, size_kib: int):
  """A tmpfs of `size_kib` KiB mounted at `path` (root only; skipped otherwise)."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or not _mount('-t', 'tmpfs', '-o', f'size={size_kib}k', 'tmpfs', path):
    pytest.skip('a small filesystem needs root and permission to mount tmpfs')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', path], check=True)
