"""Entry points answer every broken config file, bad optimizer value and Ctrl-C with one line
and the right exit status: 2 for bad input, 130 for Ctrl-C (docs/RELIABILITY.md)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_module
from test_train import cli_overrides
from twotower_jax import cli
from twotower_jax.train import checkpoints


def one_error_line(proc, code=2) -> str:
  assert proc.returncode == code, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('source, override, match', [
    (None, True, 'nope.py: the file does not exist; pass a config file'),
    ('def get_config(:\n', False, 'syntax error at line 1'),
    ('def get_config(:\n', True, 'syntax error at line 1'),
    ('x = undefined_name\n', True, "NameError: name 'undefined_name' is not defined at line 1"),
    ('def config():\n  pass\n', False, 'it has no get_config(); define get_config()'),
    ('def get_config():\n  raise RuntimeError("boom")\n', True, 'raised RuntimeError: boom'),
    ('def get_config():\n  return None\n', False, 'returned NoneType, not a ConfigDict'),
])
def test_a_broken_config_file_is_one_line(tmp_path, source, override, match):
  path = tmp_path / 'nope.py'
  if source is not None:
    path.write_text(source)
  workdir = tmp_path / 'run'
  args = ['--config.train.steps=3'] if override else []
  proc = run_module('twotower_jax.main', f'--config={path}', f'--workdir={workdir}', *args,
                    timeout=120)
  line = one_error_line(proc)
  assert line.startswith(f'error: cannot load config --config={path}: ') and match in line, line
  assert not workdir.exists()


def test_a_nan_learning_rate_is_refused_at_once(tmp_path):
  proc = run_module('twotower_jax.main', '--config=configs/default.py',
                    f'--workdir={tmp_path / "run"}', '--config.optimizer.lr=nan', timeout=120)
  assert 'optimizer.lr=nan must be a finite number > 0' in one_error_line(proc)
  assert not (tmp_path / 'run').exists()


def test_a_workdir_that_is_a_file_through_both_commands(tmp_path):
  file = tmp_path / 'run'
  file.write_text('x')
  for module, args in (('twotower_jax.main', ['--config=configs/default.py']),
                       ('twotower_jax.analyze', [])):
    proc = run_module(module, *args, f'--workdir={file}', timeout=300)
    assert 'is a file, not a directory' in one_error_line(proc), module
  assert file.read_text() == 'x'


def test_an_empty_workdir_is_one_line(tmp_path):
  proc = run_module('twotower_jax.main', '--config=configs/default.py', '--workdir=',
                    timeout=120)
  assert '--workdir=DIR is required' in one_error_line(proc)


# Runs `python -m MODULE ARGS` with Ctrl-C as from a shell prompt: a suite started in the
# background by a shell without job control inherits SIGINT ignored, and Python keeps
# ignoring it. (A preexec_fn would fork a multithreaded JAX process.)
AS_IN_A_TERMINAL = ('import runpy, signal, sys; signal.signal(signal.SIGINT, '
                    'signal.default_int_handler); sys.argv = sys.argv[1:]; '
                    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def signal_at(module, args, marker, signum):
  """Starts `python -m module args`, sends `signum` once stderr shows `marker`; returns
  (rc, stderr after)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.Popen([sys.executable, '-c', AS_IN_A_TERMINAL, module, *args], cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if marker in line:
      break
  assert marker in ''.join(seen), ''.join(seen)[-3000:]
  proc.send_signal(signum)
  rest = proc.stderr.read()
  proc.wait(timeout=300)
  return proc.returncode, rest


def interrupt_at(config, workdir, marker):
  """Starts training, sends SIGINT once stderr shows `marker`."""
  return signal_at('twotower_jax.main', ['--config=configs/default.py', f'--workdir={workdir}',
                                         *cli_overrides(config)], marker, signal.SIGINT)


def test_ctrl_c_during_the_preflight_compile_exits_130_in_one_line(tiny, tmp_path):
  code, rest = interrupt_at(tiny(), str(tmp_path / 'run'), 'preflight: compiling the train step')
  assert code == 130, rest[-3000:]
  lines = [l for l in rest.splitlines() if l.strip()]
  errors_ = [l for l in lines if l.startswith('error: ')]
  assert errors_ == ['error: interrupted (Ctrl-C); rerun the same command to continue '
                     '(training resumes from its last checkpoint)'], rest[-3000:]
  assert 'Traceback' not in rest and 'Segmentation' not in rest and 'core dumped' not in rest


def test_ctrl_c_while_training_saves_then_exits_130(tiny, tmp_path):
  workdir = str(tmp_path / 'run')
  code, rest = interrupt_at(tiny(**{'train.steps': 200, 'train.checkpoint_every': 100}),
                            workdir, 'step 2/200')
  assert code == 130, rest[-3000:]
  assert 'stopped by SIGINT at step' in rest and 'Traceback' not in rest
  stopped = int(rest.split('stopped by SIGINT at step ')[1].split(';')[0])
  assert checkpoints.complete_steps(workdir)[-1] == stopped  # the step it finished was saved


def signal_analysis_at(workdir, marker, signum):
  """Starts the analysis of `workdir`, sends `signum` once stderr shows `marker`."""
  return signal_at('twotower_jax.analyze', [f'--workdir={workdir}'], marker, signum)


@pytest.mark.parametrize('signum, code, name', [(signal.SIGINT, 130, 'interrupted (Ctrl-C)'),
                                                (signal.SIGTERM, 143, 'terminated (SIGTERM)')])
def test_a_stopped_analysis_says_so_and_keeps_the_last_one(two_step_run, tmp_path, signum, code,
                                                           name):
  """Ctrl-C or SIGTERM while analysing: one line that does not promise a training resume,
  the shell's exit status, and the analysis written before is still whole."""
  import shutil  # pylint: disable=g-import-not-at-top
  from twotower_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(two_step_run[1], workdir)
  done = run_module('twotower_jax.analyze', f'--workdir={workdir}', timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = workdir_lib.analysis_dir(workdir)
  before = {f: open(os.path.join(out, f), 'rb').read() for f in sorted(os.listdir(out))
            if os.path.isfile(os.path.join(out, f))}
  rc, rest = signal_analysis_at(workdir, 'analysis: step', signum)
  assert rc == code, rest[-3000:]
  errors_ = [l for l in rest.splitlines() if l.startswith('error: ')]
  assert errors_ == [f'error: {name}; rerun the same command to start it again (what earlier '
                     'runs wrote stays whole)'], rest[-3000:]
  assert 'Traceback' not in rest
  after = {f: open(os.path.join(out, f), 'rb').read() for f in before}
  assert after == before
  assert not [e for e in os.listdir(workdir) if '.tmp-' in e]  # the staged output removed


@pytest.mark.parametrize('module, args', [
    ('twotower_jax.analyze', ['--workdir=nowhere', '--config.analysis.foo=1']),
    ('twotower_jax.analyze', ['--workdir=nowhere', '--config.train.foo=1']),
    ('twotower_jax.main', ['--config=configs/default.py', '--workdir=nowhere',
                           '--config.analysis.foo=1']),
])
def test_an_unknown_override_is_one_line_naming_its_flag(module, args):
  """analyze's --config is parsed when its flag is defined (at import), main's at parse time:
  both give one line that names the field and the flag."""
  proc = run_module(module, *args, timeout=120)
  line = one_error_line(proc)
  assert 'unknown config field foo (from --config.' in line and '.foo)' in line, line


def test_a_whole_section_override_is_refused_by_analyze_too(tmp_path):
  """analyze dropped --config.analysis={...} without a word (it reads analysis.x fields)."""
  proc = run_module('twotower_jax.analyze', f'--workdir={tmp_path}',
                    "--config.analysis={'min_count': 3}", timeout=120)
  line = one_error_line(proc)
  assert "replaces the whole analysis section" in line and '--config.analysis.min_count=3' in line


def test_training_refuses_analysis_settings_its_job_could_not_use(tmp_path):
  proc = run_module('twotower_jax.main', '--config=configs/default.py',
                    f'--workdir={tmp_path / "run"}', '--config.analysis.estimators=nope',
                    timeout=120)
  assert "analysis.estimators='nope'" in one_error_line(proc)
  assert not os.path.exists(tmp_path / 'run')


class _RaisesInDel:
  """Raises `exc` from __del__, where Python cannot raise it: it goes to sys.unraisablehook,
  as a Ctrl-C does that lands in jax's garbage-collection callback during a compile."""

  def __init__(self, exc):
    self.exc = exc

  def __del__(self):
    raise self.exc


@pytest.mark.parametrize('exc', [KeyboardInterrupt, cli._Terminated])  # pylint: disable=protected-access
def test_an_interrupt_python_had_to_drop_is_delivered_again(monkeypatch, exc):
  """Seen in CI: Ctrl-C in the pre-flight compile raised inside a gc callback, was printed
  as 'Exception ignored' and training ran to the end (exit 0, not 130)."""
  monkeypatch.setattr(sys, 'unraisablehook', cli._unraisable)  # pylint: disable=protected-access
  previous = signal.signal(signal.SIGTERM, cli._raise_terminated)  # pylint: disable=protected-access
  # Python's own SIGINT handler, whatever an earlier test left (interrupt_main does nothing
  # for a signal set to SIG_DFL or SIG_IGN)
  previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(exc):
      _RaisesInDel(exc())  # dropped at once: the hook re-delivers it to this thread
      deadline = time.monotonic() + 20  # a loaded machine may start the timer thread late
      while time.monotonic() < deadline:
        time.sleep(0.001)
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)


_COLLECT_FAILED_TASKS = """
import asyncio, gc, os, sys
from twotower_jax import cli
cli.setup_logging()
for where in sys.argv[1:]:  # a failing task from each module path, dropped unretrieved
  namespace = {}
  exec(compile('async def write_fragment():\\n  raise OSError(28, "No space left")\\n',
               os.path.join(os.sep, 'site-packages', where, 'serialization.py'), 'exec'),
       namespace)
  loop = asyncio.new_event_loop()
  task = loop.create_task(namespace['write_fragment']())
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  del task
  gc.collect()  # asyncio logs 'Task exception was never retrieved' here
"""


@pytest.mark.parametrize('where', ['orbax', 'mine'])
def test_asyncio_reports_of_failed_orbax_writes_are_dropped(where):
  """Seen in CI: a full disk's one-line error came with six more lines, asyncio's report of
  Orbax's unretrieved write tasks. Tasks of other code are still reported."""
  proc = subprocess.run([sys.executable, '-c', _COLLECT_FAILED_TASKS, where], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=True)
  reported = 'Task exception was never retrieved' in proc.stderr
  assert reported == (where == 'mine'), proc.stderr


def test_exceptions_orbax_code_could_not_raise_are_dropped(monkeypatch, capsys):
  """An Orbax coroutine collected after a failed read or save raises where Python cannot
  (seen in CI as 'Exception ignored in: <coroutine object _read_array_index_and_device_put>'):
  the command's one error line stands alone. Other code's are still printed."""
  monkeypatch.setattr(sys, 'unraisablehook', cli._unraisable)  # pylint: disable=protected-access
  for where in ('orbax', 'mine'):
    namespace = {}
    exec(compile('class Fragment:\n  def __del__(self):\n    raise OSError(28, "full")\n',  # pylint: disable=exec-used
                 os.path.join(os.sep, 'site-packages', where, 'serialization.py'), 'exec'),
         namespace)
    namespace['Fragment']()  # collected at once: its OSError goes to the hook
    printed = capsys.readouterr().err
    assert ('Exception ignored' in printed) == (where == 'mine'), printed
