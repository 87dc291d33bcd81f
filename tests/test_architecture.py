"""The package's layers (docs/DESIGN.md, "Architecture"): no import circles, no upward imports,
and no module over ~500 lines."""

import ast
import os

import pytest

from conftest import REPO

PACKAGE = 'twotower_jax'
# Bottom to top; a module may import from its own layer or any layer below it. A package
# name stands for every module in it.
LAYERS = (
    ('errors', 'hostmem', 'cpu_devices', 'paths'),
    ('config', 'analysis_config', 'config_doc', 'workdir', 'preference_table', 'staging'),
    ('data',),
    ('model',),
    ('train',),
    ('run', 'report'),
    ('analysis', 'generation'),
    ('cli',),
    ('main', 'analyze', 'planted_check', 'validate', 'generate', 'prepare', 'experiment',
     'align'),
)
MAX_LINES = 520


def _modules() -> dict[str, str]:
  """{dotted module name: path} for every module of the package."""
  out = {}
  root = os.path.join(REPO, PACKAGE)
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, name), REPO)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(
            dirpath, name)
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The package modules a file imports, anywhere in it (function bodies included)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
               for a in node.names]
    else:
      continue
    out.update(n for n in names if n == PACKAGE or n.startswith(PACKAGE + '.'))
  return out


def _layer(module: str) -> int:
  top = module.split('.')[1] if module != PACKAGE else ''
  for i, names in enumerate(LAYERS):
    if top in names:
      return i
  raise AssertionError(f'{module} is in no layer of tests/test_architecture.py; add it there '
                       'and to docs/DESIGN.md')


@pytest.fixture(scope='module')
def graph():
  modules = _modules()
  return {m: _imports(path, modules) - {m} for m, path in modules.items()}


def test_every_import_points_down_or_across(graph):
  upward = [f'{m} ({_layer(m)}) imports {t} ({_layer(t)})' for m, targets in graph.items()
            if m != PACKAGE for t in targets if t != PACKAGE and _layer(t) > _layer(m)]
  assert not upward, '\n'.join(sorted(upward))


def test_no_import_circles(graph):
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if state.get(t) == 'open':
        raise AssertionError('import circle: ' + ' -> '.join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_model_and_data_know_nothing_of_training_and_training_nothing_of_analysis(graph):
  for m, targets in graph.items():
    if m.startswith(f'{PACKAGE}.model') or m.startswith(f'{PACKAGE}.data'):
      assert not [t for t in targets if t.startswith(f'{PACKAGE}.train')], m
    if m.startswith(f'{PACKAGE}.train'):
      assert not [t for t in targets if t.startswith(f'{PACKAGE}.analysis')], m


def test_the_checker_sees_a_planted_upward_import(tmp_path):
  """The graph reader itself: a function-level import of the loop from data is found."""
  path = tmp_path / 'bad.py'
  path.write_text('def f():\n  from twotower_jax.train import loop\n')
  modules = _modules()
  assert _imports(str(path), modules) == {'twotower_jax.train.loop'}
  assert _layer('twotower_jax.train.loop') > _layer('twotower_jax.data.corpus')


def test_no_module_is_over_about_500_lines():
  long = []
  for module, path in _modules().items():
    with open(path) as f:
      n = sum(1 for _ in f)
    if n > MAX_LINES:
      long.append(f'{module}: {n} lines')
  assert not long, long
