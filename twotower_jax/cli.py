"""Shared entry-point plumbing: flag parsing, logging, one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from absl import app
from absl import flags

from twotower_jax import errors


def _one_line(message) -> str:
  """One line of text; undoes the repr() quoting that KeyError puts on its message."""
  text = str(message.args[0] if isinstance(message, KeyError) and message.args else message)
  if len(text) >= 2 and text[0] == text[-1] == "'":
    text = text[1:-1].replace('\\n', '\n').replace("\\'", "'")
  return ' '.join(part.strip() for part in text.splitlines() if part.strip())


def _exit_with(message: str) -> None:
  sys.stderr.write(f'error: {message}\n')
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl prints a page of help on a bad flag; we print one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    first = _one_line(str(e).splitlines()[0])
    if first.startswith('flag --config.'):  # a config override whose value has the wrong type
      first = (f'bad config override {first[len("flag "):]}; give a value of the '
               "field's type (defaults in twotower_jax/config.py)")
    _exit_with(first)
  except (KeyError, AttributeError) as e:  # an override of a field that does not exist
    _exit_with(f'unknown config field {_one_line(e)} (every field and its default is in '
               'twotower_jax/config.py)')
  except (TypeError, ValueError) as e:  # an override with a value of the wrong type
    _exit_with(f'bad config override: {_one_line(e)}')
  return []


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


def setup_logging() -> None:
  """Our progress lines on stderr; library chatter (Orbax, absl, jax) only from WARNING."""
  logger = logging.getLogger('twotower_jax')
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S'))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for noisy in ('absl', 'jax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[[list[str]], None]) -> int:
  """Runs `main` under absl; a UserError becomes 'error: ...' and exit status 2."""
  def wrapped(argv):
    setup_logging()
    try:
      main(argv)
    except errors.UserError as e:
      _exit_with(_one_line(e))

  try:
    app.run(wrapped, flags_parser=_parse_flags)
  except SystemExit as e:
    if e.code is None:
      return 0
    return e.code if isinstance(e.code, int) else 1
  return 0
