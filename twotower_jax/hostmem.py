"""Host memory for XLA:CPU: back each step's temporaries with transparent huge pages.

XLA:CPU mallocs one block for a step's temporaries when the step starts (776 MiB for
the default config) and frees it when the step ends. glibc serves blocks that large
with a fresh mmap and unmaps them on free, so every 4 KiB page is faulted in and
zeroed again on every step: about 200,000 page faults per step there, a fifth of the
CPU time and 12% of the step's wall time on a 2-core VM. glibc's
`glibc.malloc.hugetlb=1` tunable asks the kernel for 2 MiB transparent huge pages on
those blocks (512x fewer faults) when the kernel's THP mode is `madvise`, the usual
default. Tunables are read only at process start, so this is host tuning set in the
environment before Python starts: the launch scripts (launch/env.sh) export it where it
applies, and an entry point started without them (`python -m twotower_jax.main`, the
bench scripts) restarts itself once with it (`restart`, called first in their
`__main__`; library code never restarts a process). TWOTOWER_HUGE_PAGES=0 turns both off.

  python -m twotower_jax.hostmem            # prints whether it applies here, and why
  eval "$(python -m twotower_jax.hostmem --export)"   # what launch/env.sh runs
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'TWOTOWER_HUGE_PAGES'  # '0' keeps glibc's default behaviour
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
MIN_GLIBC = (2, 35)  # first release with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's THP mode ('always', 'madvise' or 'never'); None without THP."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return None
  return tuple(int(p) for p in version.split('.') if p.isdigit())


def active(env: Mapping[str, str] = os.environ) -> bool:
  """Whether this environment already carries the tunable."""
  return TUNABLE in env.get('GLIBC_TUNABLES', '').split(':')


def unsupported(mode: str | None = None, libc: tuple[int, ...] | None = None,
                system: str | None = None) -> str | None:
  """Why this machine cannot use the tunable, or None when it can."""
  system = platform.system() if system is None else system
  if system != 'Linux':
    return f'not Linux ({system})'
  libc = glibc_version() if libc is None else libc
  if libc is None or libc < MIN_GLIBC:
    return f'needs glibc >= {".".join(map(str, MIN_GLIBC))}, found {libc}'
  mode = thp_mode() if mode is None else mode
  if mode != 'madvise':
    return (f'kernel THP mode is {mode!r}: ' +
            ('huge pages are already the default' if mode == 'always' else 'no huge pages'))
  return None


def reason(env: Mapping[str, str] = os.environ, **machine) -> str | None:
  """Why an entry point should not restart with the tunable, or None when it should.

  `machine` (mode, libc, system) overrides what `unsupported` reads, for tests.
  """
  if env.get(OPT_OUT, '1') == '0':
    return f'{OPT_OUT}=0'
  if active(env):
    return 'already set'
  return unsupported(**machine)


def with_tunable(env: Mapping[str, str]) -> dict[str, str]:
  """A copy of `env` with the tunable appended to GLIBC_TUNABLES (others kept)."""
  out = dict(env)
  if not active(env):
    out['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES', ''), TUNABLE]))
  return out


def without_tunable(env: Mapping[str, str]) -> dict[str, str]:
  """A copy of `env` that keeps glibc's default: tunable removed, re-exec opted out."""
  out = dict(env)
  rest = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t and t != TUNABLE]
  out.pop('GLIBC_TUNABLES', None)
  if rest:
    out['GLIBC_TUNABLES'] = ':'.join(rest)
  out[OPT_OUT] = '0'
  return out


def restart() -> None:
  """Replaces this process by itself with the tunable where it applies (else returns): a
  command started without launch/ gets the host settings of one started through it.

  For entry points' `__main__` only, before any JAX use (never library code or tests: the
  running process is replaced). Interpreter options and arguments are kept
  (sys.orig_argv); the new process has the tunable, so it does not restart again.
  """
  if reason() is not None or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable(os.environ))
  except OSError as e:  # run on with glibc's defaults: slower on CPU, the same results
    sys.stderr.write(f'warning: could not restart with {TUNABLE} ({e}); continuing without\n')


def export_line(env: Mapping[str, str] = os.environ, **machine) -> str:
  """A shell line exporting GLIBC_TUNABLES with the tunable where it applies, else ''."""
  if reason(env, **machine) is not None:
    return ''
  return f"export GLIBC_TUNABLES='{with_tunable(env)['GLIBC_TUNABLES']}'"


if __name__ == '__main__':
  if sys.argv[1:] == ['--export']:
    print(export_line())
  elif sys.argv[1:]:
    sys.exit('usage: python -m twotower_jax.hostmem [--export]')
  elif active():
    print(f'on: GLIBC_TUNABLES has {TUNABLE}')
  elif reason() is None:
    print(f'applies: launch/env.sh exports GLIBC_TUNABLES={TUNABLE} and entry points restart '
          'with it (off: TWOTOWER_HUGE_PAGES=0)')
  else:
    print(f'off: {reason()}')
