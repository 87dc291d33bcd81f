"""Huge-page host buffers: when the tunable applies, how the environment is edited,
that the launch scripts export it and entry points restart with it, and that it puts
XLA:CPU temporaries on huge pages."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from twotower_jax import hostmem

LINUX_MADVISE = {'mode': 'madvise', 'libc': (2, 36), 'system': 'Linux'}


def test_applies_only_on_linux_glibc_with_thp_on_request():
  assert hostmem.reason({}, **LINUX_MADVISE) is None
  assert 'already the default' in hostmem.reason({}, **{**LINUX_MADVISE, 'mode': 'always'})
  assert 'no huge pages' in hostmem.reason({}, **{**LINUX_MADVISE, 'mode': 'never'})
  assert 'Darwin' in hostmem.reason({}, **{**LINUX_MADVISE, 'system': 'Darwin'})
  assert '2.35' in hostmem.reason({}, **{**LINUX_MADVISE, 'libc': (2, 31)})
  assert hostmem.reason({hostmem.OPT_OUT: '0'}, **LINUX_MADVISE) == 'TWOTOWER_HUGE_PAGES=0'
  assert hostmem.reason({'GLIBC_TUNABLES': hostmem.TUNABLE}, **LINUX_MADVISE) == 'already set'


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hostmem.thp_mode(str(path)) == 'madvise'
  assert hostmem.thp_mode(str(tmp_path / 'missing')) is None


def test_environment_edits_keep_other_tunables():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'HOME': '/h'}
  on = hostmem.with_tunable(env)
  assert on['GLIBC_TUNABLES'] == f'glibc.malloc.arena_max=2:{hostmem.TUNABLE}'
  assert hostmem.with_tunable(on) == on and hostmem.active(on)
  off = hostmem.without_tunable(on)
  assert off['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2' and off[hostmem.OPT_OUT] == '0'
  assert 'GLIBC_TUNABLES' not in hostmem.without_tunable({'GLIBC_TUNABLES': hostmem.TUNABLE})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'HOME': '/h'}  # not mutated


def test_export_line_only_where_the_tunable_applies():
  line = hostmem.export_line({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, **LINUX_MADVISE)
  assert line == f"export GLIBC_TUNABLES='glibc.malloc.arena_max=2:{hostmem.TUNABLE}'"
  assert hostmem.export_line({hostmem.OPT_OUT: '0'}, **LINUX_MADVISE) == ''
  assert hostmem.export_line({}, **{**LINUX_MADVISE, 'mode': 'never'}) == ''


def test_restart_replaces_the_process_with_the_tunable_once(monkeypatch):
  """An entry point started without launch/ restarts itself with the tunable (arguments
  and interpreter options kept); one that has it, or opted out, runs on."""
  calls = []
  monkeypatch.setattr(os, 'execve', lambda path, argv, env: calls.append((path, argv, env)))
  monkeypatch.setattr(hostmem, 'unsupported', lambda **machine: None)
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.delenv(hostmem.OPT_OUT, raising=False)
  hostmem.restart()
  ((path, argv, env),) = calls
  assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
  assert hostmem.active(env) and hostmem.reason(env) == 'already set'
  monkeypatch.setenv(hostmem.OPT_OUT, '0')
  hostmem.restart()
  monkeypatch.delenv(hostmem.OPT_OUT)
  monkeypatch.setenv('GLIBC_TUNABLES', hostmem.TUNABLE)
  hostmem.restart()
  assert len(calls) == 1


def test_a_failed_restart_runs_on_without_the_tunable(monkeypatch, capsys):
  def fail(*args):
    raise OSError('exec format error')
  monkeypatch.setattr(hostmem, 'reason', lambda: None)
  monkeypatch.setattr(os, 'execve', fail)
  hostmem.restart()  # returns instead of raising
  assert 'could not restart with glibc.malloc.hugetlb=1' in capsys.readouterr().err


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, check=True, timeout=300)


@pytest.mark.skipif(hostmem.unsupported() is not None, reason=str(hostmem.unsupported()))
def test_launch_env_and_entry_points_set_the_tunable_unless_opted_out():
  """The line launch/env.sh runs gives the processes it starts the tunable, and an entry
  point started without it restarts with it; importing the library changes nothing."""
  with open(os.path.join(REPO, 'launch', 'env.sh')) as f:
    (line,) = [l for l in f.read().splitlines() if 'twotower_jax.hostmem' in l]
  script = line + '; python -c "import os; print(os.environ.get(\'GLIBC_TUNABLES\', \'\'))"'
  base = hostmem.without_tunable(os.environ)
  base.pop(hostmem.OPT_OUT)
  base['PATH'] = os.path.dirname(sys.executable) + os.pathsep + base.get('PATH', '')
  base['PYTHONPATH'] = REPO
  on = subprocess.run(['bash', '-c', script], env=base, capture_output=True, text=True, check=True)
  assert hostmem.TUNABLE in on.stdout
  off = subprocess.run(['bash', '-c', script], env={**base, hostmem.OPT_OUT: '0'},
                       capture_output=True, text=True, check=True)
  assert hostmem.TUNABLE not in off.stdout
  imported = _python("import os; from twotower_jax import cli; "
                     "print(os.environ.get('GLIBC_TUNABLES', ''))", {**base})
  assert hostmem.TUNABLE not in imported.stdout  # importing the entry plumbing changes nothing
  started = _python("import os; from twotower_jax import cli; "
                    "cli.run(lambda argv: print(os.environ.get('GLIBC_TUNABLES', '')))", base)
  assert hostmem.TUNABLE in started.stdout  # an entry point (cli.run) restarts with it
  opted_out = _python("import os; from twotower_jax import cli; "
                      "cli.run(lambda argv: print(os.environ.get('GLIBC_TUNABLES', '')))",
                      {**base, hostmem.OPT_OUT: '0'})
  assert hostmem.TUNABLE not in opted_out.stdout


@pytest.mark.skipif(hostmem.unsupported() is not None, reason=str(hostmem.unsupported()))
def test_tunable_backs_xla_temporaries_with_huge_pages():
  """XLA:CPU's temporaries (here a 64 MiB matmul output) come from glibc malloc; with the
  tunable glibc madvises them and the kernel backs them with 2 MiB pages, without it (THP
  mode madvise) it does not. Page-fault counts vary with glibc's dynamic mmap threshold,
  so the test reads the huge-page backing itself."""
  code = """
      import jax, jax.numpy as jnp
      f = jax.jit(lambda x, w: jnp.sum((x @ w) @ w.T))
      x, w = jnp.ones((4096, 1024)), jnp.ones((1024, 4096)) / 1024
      for _ in range(3):
        jax.block_until_ready(f(x, w))
      with open('/proc/self/smaps_rollup') as f:
        print([int(l.split()[1]) for l in f if l.startswith('AnonHugePages:')][0])
  """
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  default_kb = int(_python(code, hostmem.without_tunable(env)).stdout)
  huge_kb = int(_python(code, hostmem.with_tunable(env)).stdout)
  assert default_kb == 0, default_kb  # the premise: madvise mode, nothing asks for them
  assert huge_kb >= 32 * 1024, huge_kb  # at least half the temporary on huge pages
