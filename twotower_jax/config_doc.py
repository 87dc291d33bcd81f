"""docs/CONFIG.md, the config field reference, generated from config.py's own comments.

Each field of `config.base_config()` is documented by its comment in config.py (the
analysis section's in analysis_config.py, which builds it): the
comment after it on its line, or, when it has none, the comment block right above it.
A block above a section (`c.x = ml_collections.ConfigDict()`) or above a field that has
its own comment introduces the fields that follow. Defaults come from `base_config()`
itself, so the reference cannot drift from the code; a field without a comment is an
error. Regenerate after changing a field: `python -m twotower_jax.config_doc`
(`--check` only compares; tests/test_config_doc.py runs it).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import re
import sys
import tokenize
from typing import Any

import ml_collections

from twotower_jax import analysis_config
from twotower_jax import config as config_lib

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                        'CONFIG.md')
REGENERATE = 'python -m twotower_jax.config_doc'
_ROW = re.compile(r'^\| `([\w.]+)` \| `(.*?)` \| ')


class ConfigDocError(config_lib.ConfigError):
  """config.py cannot be documented as it is; the message names the field and the fix."""


@dataclasses.dataclass
class Entry:
  """One statement of base_config(): a field, or a section (a nested ConfigDict)."""
  path: str
  is_section: bool
  comment: str  # the field's own comment ('' for a section)
  note: str  # the block above that introduces what follows ('' if none)


def _dotted(node: ast.AST) -> str | None:
  """'model.embedding.mode' for the target `c.model.embedding.mode`; None otherwise."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  return '.'.join(reversed(names)) if isinstance(node, ast.Name) and names else None


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """({line: text} of comments alone on their line, {line: text} of trailing comments)."""
  alone, trailing = {}, {}
  lines = source.splitlines()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      row, col = tok.start
      text = tok.string.lstrip('#').strip()
      (trailing if lines[row - 1][:col].strip() else alone)[row] = text
  return alone, trailing


def entries(source: str, function: str = 'base_config', prefix: str = '') -> list[Entry]:
  """The fields and sections `function` assigns in `source` (config.py's base_config(), or
  analysis_config.py's fields() with prefix 'analysis.'), in source order. A field set from
  another module's `fields()` call is a section."""
  fn = next(n for n in ast.parse(source).body
            if isinstance(n, ast.FunctionDef) and n.name == function)
  alone, trailing = _comments(source)
  out = []
  for stmt in fn.body:
    if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
      continue
    path = _dotted(stmt.targets[0])
    if path is None:
      continue
    path = prefix + path
    own = ' '.join(trailing[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in trailing)
    block, row = [], stmt.lineno - 1
    while row in alone:
      block.insert(0, alone[row])
      row -= 1
    block_text = ' '.join(block)
    is_section = (isinstance(stmt.value, ast.Call) and  # c.x = ml_collections.ConfigDict()
                  getattr(stmt.value.func, 'attr', None) in ('ConfigDict', 'fields'))
    if is_section or own:
      out.append(Entry(path, is_section, '' if is_section else own, block_text))
    else:
      out.append(Entry(path, False, block_text, ''))
  return out


def field_values(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """{'data.seq_len': 128, ...}: every field of `config` by its dotted path."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(field_values(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def default_text(value: Any) -> str:
  """A default as it is written in Python: 'sotu', 0.05, True, ('batch', ...)."""
  return repr(value)


def _markdown(text: str) -> str:
  """A comment as Markdown text that shows as written (in a table cell too)."""
  return re.sub(r'([\\|*<`\[\]])', r'\\\1', text)


def render(source: str, config: ml_collections.ConfigDict, analysis_source: str = '') -> str:
  """docs/CONFIG.md's text for config.py's `source` (and analysis_config.py's) and its
  base_config() `config`."""
  found = entries(source) + (entries(analysis_source, 'fields', 'analysis.')
                             if analysis_source else [])
  defaults = field_values(config)
  fields = {e.path: e for e in found if not e.is_section}
  unassigned = [p for p in defaults if p not in fields]
  if unassigned:
    raise ConfigDocError(f'config fields {", ".join(unassigned)} are not assigned in '
                         'base_config() in config.py as `c.SECTION.KEY = value`; write them so')
  silent = [p for p in defaults if not fields[p].comment]
  if silent:
    raise ConfigDocError(f'config fields without a comment in config.py (analysis.*: in '
                         f'analysis_config.py): {", ".join(silent)}; '
                         f'add one after each (or a comment block above it), then run '
                         f'`{REGENERATE}`')
  sections = [''] + [e.path for e in found if e.is_section]
  notes = {e.path: e.note for e in found if e.is_section}
  lines = [
      '# Configuration reference', '',
      f'Generated by `{REGENERATE}` from the comments in `twotower_jax/config.py` and '
      '`twotower_jax/analysis_config.py`; edit those, not this file (tests/test_config_doc.py '
      'fails when it is stale).', '',
      'Every field below can be set in a config file (`configs/*.py` start from '
      '`base_config()`) or on the command line as `--config.SECTION.KEY=VALUE`, e.g. '
      '`--config.model.n_towers=3`. The config is locked: a mistyped field or a value of '
      'the wrong type stops with a one-line error before anything is written.']
  header = ['| field | default | meaning |', '|---|---|---|']
  for section in sections:
    members = [e for e in found if not e.is_section and e.path.rpartition('.')[0] == section]
    if not members:
      continue
    level = '##' if section.count('.') == 0 else '###'
    lines += ['', f'{level} `{section}`' if section else f'{level} Top level', '']
    if notes.get(section):
      lines += [_markdown(notes[section]), '']
    in_table = False
    for e in members:
      if e.note:
        lines += ([''] if in_table else []) + [_markdown(e.note), '']
        in_table = False
      if not in_table:
        lines += header
        in_table = True
      lines.append(f'| `{e.path}` | `{default_text(defaults[e.path])}` | {_markdown(e.comment)} |')
  return '\n'.join(lines) + '\n'


def documented_defaults(text: str) -> dict[str, str]:
  """{field: default as written} of the table rows in a CONFIG.md text."""
  return {m.group(1): m.group(2) for m in map(_ROW.match, text.splitlines()) if m}


def stale(doc_text: str, config: ml_collections.ConfigDict) -> list[str]:
  """What `doc_text` (docs/CONFIG.md) gets wrong about `config`'s fields, one line each."""
  have, want = documented_defaults(doc_text), {
      p: default_text(v) for p, v in field_values(config).items()}
  out = [f'{p}: missing' for p in want if p not in have]
  out += [f'{p}: documented default {have[p]}, the code has {want[p]}'
          for p in want if p in have and have[p] != want[p]]
  out += [f'{p}: documented, but config.py has no such field' for p in have if p not in want]
  return out


def current() -> str:
  """docs/CONFIG.md as this version of config.py makes it."""
  with open(config_lib.__file__, encoding='utf-8') as f, open(analysis_config.__file__,
                                                             encoding='utf-8') as g:
    return render(f.read(), config_lib.base_config(), g.read())


def main(argv: list[str]) -> int:
  """Writes docs/CONFIG.md; with --check, reports whether it is current instead (exit 1)."""
  try:
    text = current()
  except ConfigDocError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if '--check' in argv[1:]:
    on_disk = open(DOC_PATH, encoding='utf-8').read() if os.path.exists(DOC_PATH) else ''
    if on_disk == text:
      return 0
    for line in stale(on_disk, config_lib.base_config()) or ['field comments changed']:
      print(f'docs/CONFIG.md is stale: {line}', file=sys.stderr)
    print(f'regenerate it: {REGENERATE}', file=sys.stderr)
    return 1
  with open(DOC_PATH, 'w', encoding='utf-8') as f:
    f.write(text)
  print(f'wrote {DOC_PATH}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
