"""Shared entry-point plumbing: flag parsing, logging, one-line errors for bad input.

Every way a command can fail on its input ends in one line `error: ...` and exit 2:
a bad flag or config file, a `UserError`, a disk that is full or read-only. Ctrl-C
(SIGINT) outside the train loop, which saves first, exits 130 with one line, without
a traceback and without tearing down the interpreter under XLA's running threads.
"""

from __future__ import annotations

import _thread
import errno
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from twotower_jax import errors
from twotower_jax import hostmem


def one_line(message) -> str:
  """One line of text; undoes the repr() quoting that KeyError puts on its message."""
  text = str(message.args[0] if isinstance(message, KeyError) and message.args else message)
  if len(text) >= 2 and text[0] == text[-1] == "'":
    text = text[1:-1].replace('\\n', '\n').replace("\\'", "'")
  return ' '.join(part.strip() for part in text.splitlines() if part.strip())


def _exit_with(message: str) -> None:
  sys.stderr.write(f'error: {message}\n')
  sys.exit(2)


def _parse_flags(argv: list[str], config_files: Sequence[str] = ()) -> list[str]:
  """absl prints a page of help on a bad flag; we print one line and exit 2."""
  for name in config_files:  # before absl loads them, so a broken file is one line
    spec = _flag_value(argv[1:], name)
    if spec is not None:
      try:
        check_config_file(spec, name)
      except errors.UserError as e:
        _exit_with(one_line(e))
  try:
    rest = flags.FLAGS(argv)
    whole = _section_override()
    if whole:
      _exit_with(whole)
    return rest
  except flags.Error as e:
    first = one_line(str(e).splitlines()[0])
    if first.startswith('flag --config.'):  # a config override whose value has the wrong type
      first = (f'bad config override {first[len("flag "):]}; give a value of the '
               "field's type (defaults in twotower_jax/config.py)")
    _exit_with(first)
  except (KeyError, AttributeError) as e:  # an override of a field that does not exist
    _exit_with(_unknown_field(e, argv))
  except (TypeError, ValueError) as e:  # an override with a value of the wrong type
    _exit_with(f'bad config override: {one_line(e)}')
  return []


def _section_override() -> str | None:
  """Why an override such as --config.model={'n_towers': 3} is refused: it replaces a whole
  section by a dict missing every other field (a KeyError later, or ignored by analyze)."""
  for name in list(flags.FLAGS):
    try:
      overrides = config_flags.get_override_values(flags.FLAGS[name])
    except TypeError:  # not a config flag
      continue
    for key, value in overrides.items():
      if hasattr(value, 'keys'):
        field = next(iter(value.keys()), None)
        example = f'{key}.{field}={value[field]!r}' if field else f'{key}.FIELD=VALUE'
        return (f'--{name}.{key}={{...}} replaces the whole {key} section (every other field '
                f'would be lost); set its fields one at a time, e.g. --{name}.{example}')
  return None


def _unknown_field(e: BaseException, argv: Sequence[str]) -> str:
  """'unknown config field NAME in --config.A.NAME=...': ml_collections' KeyError, re-raised
  as AttributeError, quotes the name twice; the flag that gave it names its section."""
  text = one_line(e)
  name = re.split(r'[\s\'"]+', text.strip('\'" '))[0]  # before ml_collections' 'Did you mean'
  given = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
  flag = next((g for g in given if g.split('.')[-1] == name or f'.{name}.' in g), None)
  where = f' (from {flag})' if flag else ''
  close = re.search(r'Did you mean "([^"]+)"', text)
  section = flag[len('--config.'):flag.rindex(f'.{name}') + 1] if flag else ''
  hint = f'did you mean {section}{close.group(1)}? ' if close else ''
  return (f'unknown config field {name}{where}; {hint}every field and its default is in '
          'twotower_jax/config.py')


def define_config(define: Callable[..., Any], *args, **kwargs) -> Any:
  """config_flags.DEFINE_config_dict/_file(...), whose default is parsed together with the
  command line's --config.* overrides when it is defined (at import): an unknown field
  there is one line and exit 2, as at parse time."""
  try:
    return define(*args, **kwargs)
  except (KeyError, AttributeError) as e:
    _exit_with(_unknown_field(e, sys.argv))


def load_config(holder):
  """The parsed config of a config_flags flag; a missing or broken file is a UserError."""
  try:
    config = holder.value
    config.keys()  # config_flags reports a failed load only on first access
  except (OSError, SyntaxError, ImportError, AttributeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise errors.UserError(f'cannot load config --{holder.name}: {lines[-1] if lines else e}; '
                           'pass a file with get_config(), e.g. configs/default.py') from None
  return config


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The last value given to --name in argv (`--name=V` or `--name V`), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def check_config_file(spec: str, flag: str = 'config', where: str = ''):
  """Loads a config file (`path[:arg]`) and calls get_config, as config_flags will, turning
  each way it can fail into one UserError naming the file and the fix; returns the config.
  `where` replaces the message's 'cannot load config --FLAG=PATH' (a file named elsewhere).

  config_flags itself reports these as tracebacks (during flag parsing when an override
  is given) or with a misleading message (no get_config).
  """
  path, *arg = spec.split(':', 1)
  where = where or f'cannot load config --{flag}={path}'
  example = 'e.g. configs/default.py'
  if not os.path.isfile(path):
    what = 'is a directory' if os.path.isdir(path) else 'does not exist'
    raise errors.UserError(f'{where}: the file {what}; pass a config file, {example}')
  try:
    module_spec = importlib.util.spec_from_file_location(f'_{flag}_file_check', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise errors.UserError(f'{where}: syntax error at line {e.lineno} ({e.msg}); fix the '
                           'file') from None
  except Exception as e:  # pylint: disable=broad-except  # any error running the file
    raise errors.UserError(f'{where}: {type(e).__name__}: {one_line(e)}{_where(e, path)}; fix '
                           'the file') from None
  if not callable(getattr(module, 'get_config', None)):
    raise errors.UserError(f'{where}: it has no get_config(); define get_config() returning '
                           f'the config, {example}')
  try:
    config = module.get_config(*arg)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f'{where}: get_config({", ".join(map(repr, arg))}) raised '
                           f'{type(e).__name__}: {one_line(e)}{_where(e, path)}; fix the file '
                           'or its argument') from None
  if not hasattr(config, 'keys') or not hasattr(config, 'lock'):
    raise errors.UserError(f'{where}: get_config() returned {type(config).__name__}, not a '
                           'ConfigDict; return config_lib.base_config() with your changes')
  return config


def _where(e: BaseException, path: str) -> str:
  """' at line N' of the innermost frame in `path`, if the traceback passes through it."""
  line, tb = None, e.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = tb.tb_lineno
    tb = tb.tb_next
  return f' at line {line}' if line else ''


def setup_logging() -> None:
  """Our progress lines on stderr; library chatter (Orbax, absl, jax, the Cloud Storage
  clients) only from WARNING."""
  logger = logging.getLogger('twotower_jax')
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S'))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for noisy in ('absl', 'jax', 'fsspec', 'gcsfs', 'google', 'urllib3'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  sys.unraisablehook = _unraisable
  for name in ('absl', 'asyncio'):
    if _drop_orbax_reports not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_drop_orbax_reports)


def _unraisable(unraisable) -> None:
  """sys.unraisablehook. A Ctrl-C or SIGTERM whose exception was raised inside a callback
  Python cannot raise from (a garbage-collection callback of jax's, during a compile) would
  be printed and dropped, and the command would run on: it is delivered to the main thread
  again. After a failed checkpoint read or save, TensorStore's threads keep posting to the
  asyncio loop Orbax has closed, each post reported as 'RuntimeError: Event loop is closed',
  and Orbax's coroutines fail as they are collected: dropped (the read or save fails with its
  own one-line error). The rest: Python's hook."""
  exc = unraisable.exc_value
  if isinstance(exc, (KeyboardInterrupt, _Terminated)):
    signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
    # From a thread, a moment later: raised here, it would land in this hook and be dropped.
    threading.Timer(0.01, _thread.interrupt_main, args=(signum,)).start()
    return
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return
  if _through_orbax(unraisable.exc_traceback):
    return
  sys.__unraisablehook__(unraisable)


_ORBAX = f'{os.sep}orbax{os.sep}'


def _through_orbax(tb) -> bool:
  """Whether a traceback passes through Orbax's code."""
  while tb is not None:
    if _ORBAX in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


# Orbax's notices that ask nothing of the user: a reading manager says it will not write.
_ORBAX_NOTICES = re.compile(r'read[ _-]?only', re.I)


def _drop_orbax_reports(record: logging.LogRecord) -> bool:
  """Orbax's warnings reach the user; dropped is only its known noise. Orbax logs each failed
  save or read as tracebacks from its threads, and asyncio logs its failed write tasks as
  'Task exception was never retrieved' when they are collected: the train loop and the
  readers turn every such failure into one error line. And a read-only notice."""
  if record.levelno >= logging.CRITICAL:
    return True
  if record.name == 'asyncio':
    return (_ORBAX not in record.getMessage()
            and not _through_orbax(record.exc_info[2] if record.exc_info else None))
  if _ORBAX not in record.pathname:
    return True
  message = record.getMessage()
  return not (record.exc_info or 'Traceback (most recent call last)' in message
              or _ORBAX_NOTICES.search(message))


# Errors of the machine rather than the code: a full or read-only disk, no permission.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _leave(message: str, code: int) -> None:
  """Prints `error: message` and exits at once with `code`.

  os._exit skips the interpreter's teardown: after a failed save or read, Orbax's threads
  and event loops would otherwise print tracebacks as they are collected, and a Ctrl-C
  during an XLA compile can crash it. Every file the run writes is closed by then (the
  `finally` blocks between the error and here have run).
  """
  sys.stdout.flush()
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


class _Terminated(BaseException):
  """SIGTERM in a command that does not train: unwinds like Ctrl-C, so `finally` blocks
  (staged outputs, locks) run before the one-line exit."""


def _raise_terminated(signum, frame):  # pylint: disable=unused-argument
  raise _Terminated()


TRAINING_RERUN = 'to continue (training resumes from its last checkpoint)'


def run(main: Callable[[list[str]], None], config_files: Sequence[str] = (),
        rerun: str = 'to start it again (what earlier runs wrote stays whole)', sigterm: bool = True) -> int:
  """Runs `main` under absl; a UserError becomes 'error: ...' and exit status 2.

  `config_files` names the config_flags file flags, checked before absl loads them.
  `rerun` says what rerunning the command does after Ctrl-C (130) or SIGTERM (143).
  `sigterm`: turn SIGTERM into that one line; the trainer leaves it to its own handler
  (train/preemption.py, or JAX's preemption service on several hosts).
  For `__main__` blocks only: it first restarts the process with the host settings
  launch/env.sh would give it (hostmem.restart), which replaces the running process.
  """
  hostmem.restart()
  def interrupted(name: str, code: int) -> None:
    _leave(f'{name}; rerun the same command {rerun}', code)

  def wrapped(argv):
    setup_logging()
    if sigterm and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, _raise_terminated)
    try:
      main(argv)
    except errors.UserError as e:
      _leave(one_line(e), 2)
    except KeyboardInterrupt:
      interrupted('interrupted (Ctrl-C)', 130)
    except _Terminated:
      interrupted('terminated (SIGTERM)', 143)
    except OSError as e:
      if e.errno not in _ENVIRONMENT_ERRNOS:
        raise
      where = f'{e.filename}: ' if e.filename else ''
      _leave(f'{where}{e.strerror}; free space or pick a writable location, then rerun', 2)

  try:
    app.run(wrapped, flags_parser=lambda argv: _parse_flags(argv, config_files))
  except KeyboardInterrupt:
    interrupted('interrupted (Ctrl-C)', 130)
  except _Terminated:
    interrupted('terminated (SIGTERM)', 143)
  except SystemExit as e:
    if e.code is None:
      return 0
    return e.code if isinstance(e.code, int) else 1
  return 0
