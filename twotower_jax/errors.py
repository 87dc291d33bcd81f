"""Errors caused by the user's input, reported as one line naming the problem and fix.

Entry points catch `UserError`, print its message and exit non-zero; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad config, data, checkpoint or command line; the message says how to fix it."""


class ConfigError(UserError):
  """A bad config value; the message names the field and the fix."""
