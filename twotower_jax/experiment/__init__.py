"""Experiments: a config of axes, answered by one command (or one job per point).

  python -m twotower_jax.experiment --config=configs/experiments/preference.py:cpu --workdir=DIR

spec.py turns the experiment config into points, runner.py trains and analyses one point
(resumable), the aggregation says what the points show together (results.json, results.md,
figures): aggregate.py, pooling.py and writeup.py the class test pooled over seeds, loss.py
eval loss at equal tokens and FLOPs (spec.AGGREGATIONS). DIR/experiment.json records the experiment;
DIR/<point>/ is each point's workdir. docs/EXPERIMENTS.md.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import uuid
from typing import Any

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.experiment import aggregate as aggregate_lib
from twotower_jax.experiment import runner
from twotower_jax.experiment import spec as spec_lib
from twotower_jax.experiment.spec import ExperimentError, Point  # noqa: F401

log = logging.getLogger('twotower_jax')
EXPERIMENT_JSON = 'experiment.json'
COMMAND = 'python -m twotower_jax.experiment'


def commit_info() -> dict[str, Any]:
  """The code's git commit and whether its tracked files have uncommitted changes."""
  def git(*args):
    return subprocess.run(['git', '-C', spec_lib.REPO, *args], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
  try:
    return {'commit': git('rev-parse', 'HEAD'),
            'dirty': bool(git('status', '--porcelain', '--untracked-files=no'))}
  except (OSError, subprocess.SubprocessError):
    return {'commit': 'unknown', 'dirty': None}


def provenance(config_spec: str, overrides: dict[str, Any]) -> dict[str, Any]:
  """The commit and the exact commands (DIR standing for the workdir) of an experiment."""
  flags = ''.join(f' --config.{k}={v}' for k, v in sorted(overrides.items()))
  base = f'{COMMAND} --config={config_spec} --workdir=DIR{flags}'
  return {'config': config_spec, 'config_overrides': dict(sorted(overrides.items())),
          **commit_info(),
          'commands': {'all': base, 'point': base + ' --point=I',
                       'aggregate': base + ' --aggregate', 'list': base + ' --list'}}


def _identity(record: dict[str, Any]) -> list:
  return [record.get('name'), [
      (p['name'], {s: config_lib.without_compile_only(p['config']).get(s)
                   for s in spec_lib.TRAINING_SECTIONS}) for p in record.get('points', [])]]


def _write_json_unique(path: str, obj: Any) -> None:
  """Atomic like workdir.write_json, with a temporary name of its own (point jobs of one
  experiment may write DIR/experiment.json at the same moment)."""
  tmp = f'{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(workdir_lib.clean(obj), f, indent=1)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def record(exp: ml_collections.ConfigDict, points: list[Point], prov: dict[str, Any]
           ) -> dict[str, Any]:
  return workdir_lib.clean({'name': exp.name, 'experiment': config_lib.to_dict(exp),
                            **{k: prov[k] for k in ('config', 'config_overrides', 'commit',
                                                    'dirty')},
                            'points': [p.record() for p in points]})


def check_dir(root: str, rec: dict[str, Any], create: bool) -> None:
  """Refuses a DIR that is a file, a training run, unrelated files or another experiment
  (nothing is written then); with `create`, writes DIR/experiment.json (again when the
  recorded analysis settings or commit changed)."""
  where = f'--workdir={root}'
  if os.path.exists(root) and not os.path.isdir(root):
    raise ExperimentError(f'{where} is a file; give a directory for the experiment')
  file = os.path.join(root, EXPERIMENT_JSON)
  if os.path.exists(os.path.join(root, workdir_lib.CONFIG_JSON)):
    raise ExperimentError(f'{where} holds a training run (config.json); give the experiment a '
                          'directory of its own')
  if not os.path.exists(file):
    others = [n for n in (os.listdir(root) if os.path.isdir(root) else [])
              if not n.startswith(EXPERIMENT_JSON + '.tmp-')]  # another job writing it now
    if others:
      raise ExperimentError(f'{where} holds files but no {EXPERIMENT_JSON}; give a new or empty '
                            'directory')
    if not create:
      raise ExperimentError(f'{where} holds no experiment; run its points first (the same '
                            'command without --aggregate, or --point=I for each)')
  else:
    old = workdir_lib.read_json(file)
    if not isinstance(old, dict) or _identity(old) != _identity(rec):
      what = (f"experiment {old.get('name')!r}" if isinstance(old, dict) and
              old.get('name') != rec['name'] else 'this experiment with other points or run '
              'configs')
      raise ExperimentError(f'{where} holds {what} ({EXPERIMENT_JSON}); use a new --workdir, or '
                            'the config that made it')
    if old == rec or not create:
      return
  os.makedirs(root, exist_ok=True)
  _write_json_unique(file, rec)


def point_index(points: list[Point], index: int) -> Point:
  if not 0 <= index < len(points):
    raise ExperimentError(f'point {index} is out of range: this experiment has {len(points)} '
                          f'points (0-{len(points) - 1}); --list prints them')
  return points[index]


def use_compile_cache(root: str) -> None:
  """jax's persistent compilation cache in DIR/.jax_cache: the points of one experiment
  compile the same few programs (one per tower type and size)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', os.path.join(root, '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def run_point(root: str, exp, points: list[Point], index: int, prov: dict[str, Any]) -> dict:
  """Trains and analyses point `index` alone (DIR/experiment.json checked or written)."""
  point = point_index(points, index)
  check_dir(root, record(exp, points, prov), create=True)
  use_compile_cache(root)
  return runner.run(root, exp, points, point, {k: prov[k] for k in ('commit', 'dirty')})


def aggregate(root: str, exp, points: list[Point], prov: dict[str, Any]) -> dict[str, Any]:
  """results.json, results.md and figures from the finished points."""
  check_dir(root, record(exp, points, prov), create=False)
  todo = [(p, runner.status(root, p, exp)) for p in points]
  todo = [f'{p.index} {p.name} ({s})' for p, s in todo if s != 'done']
  if todo:
    raise ExperimentError(f'points not finished: {", ".join(todo)}; run them (--point=I) or the '
                          'whole experiment, with the same config (a different treebank or '
                          'analysis setting makes a point unfinished)')
  kind = importlib.import_module(spec_lib.AGGREGATIONS[exp.aggregation])
  results = kind.aggregate(exp, points, root,
                           {k: prov[k] for k in ('config', 'config_overrides', 'commit', 'dirty',
                                                 'commands')})
  path = aggregate_lib.write(root, results)
  written = kind.writeup(root, results)
  log.info('experiment: wrote %s, %s and %s/', path, written['results_md'],
           os.path.join(root, workdir_lib.FIG_DIR))
  return results


def run_all(root: str, exp, points: list[Point], prov: dict[str, Any]) -> dict[str, Any]:
  """Every point (keeping the finished ones), then the aggregation."""
  check_dir(root, record(exp, points, prov), create=True)
  use_compile_cache(root)
  for p in points:
    log.info('experiment: point %d of %d: %s', p.index + 1, len(points), p.name)
    runner.run(root, exp, points, p, {k: prov[k] for k in ('commit', 'dirty')})
  return aggregate(root, exp, points, prov)


def listing(root: str | None, exp, points: list[Point]) -> str:
  """The points, one per line: index, name, kind and (with DIR) status."""
  lines = []
  for p in points:
    state = runner.status(root, p, exp) if root else ''
    values = ', '.join(f'{k}={v}' for k, v in p.values.items())
    lines.append(f'{p.index:3d}  {p.name:<24s} {p.kind:<8s} {state:<8s} {values}'.rstrip())
  return '\n'.join(lines)
