"""One point of an experiment: trained, analysed (and over training), resumable.

In this process, through the train loop and the analysis runner. A point whose run reached
its steps is not trained again; a half-trained one resumes from its last complete
checkpoint (the loop's own resume, kill -9 safe). Each analysis writes through the
runner's staged folder and then a mark file of the settings and step it was made with, so
an analysis is redone only when it is missing, unfinished or made with other settings. The
point's own mark (DIR/<point>/experiment_point.json), written last, says it is done.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from typing import Any

from twotower_jax import config as config_lib
from twotower_jax import report
from twotower_jax import staging
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import runner as analysis_runner
from twotower_jax.experiment import spec as spec_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import loop

log = logging.getLogger('twotower_jax')

POINT_MARK = 'experiment_point.json'  # DIR/<point>/: the point is done (settings, times)
ANALYSIS_MARK = 'experiment_analysis.json'  # in each analysis folder: made with what, at which step
TOKENIZER = workdir_lib.TOKENIZER  # DIR/tokenizer.model with exp.shared_tokenizer
COPIED = (workdir_lib.SUMMARY_JSON, workdir_lib.PREFERENCE_CSV)  # final step's over-training row


class Stopped(Exception):
  """Training stopped by a signal after saving (the loop's preemption path); rerun resumes."""

  def __init__(self, point: str, signal_name: str):
    super().__init__(f'stopped by {signal_name} while training {point}; its checkpoint is '
                     'saved: rerun the same command to resume')
    self.signal_name = signal_name


def point_dir(root: str, point: spec_lib.Point) -> str:
  return os.path.join(os.path.abspath(root), point.name)


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint of a run, or None."""
  if not os.path.isdir(checkpoints.directory(workdir)):
    return None
  return (checkpoints.complete_steps(workdir) or [None])[-1]


def _mark(point: spec_lib.Point, step: int) -> dict[str, Any]:
  return workdir_lib.clean({'analysis': config_lib.to_dict(point.config.analysis),
                            'step': int(step)})


def _is_marked(folder: str, mark: dict[str, Any]) -> bool:
  file = os.path.join(folder, ANALYSIS_MARK)
  return (os.path.exists(os.path.join(folder, workdir_lib.SUMMARY_JSON)) and
          os.path.exists(file) and workdir_lib.read_optional_json(file) == mark)


def expected_mark(point: spec_lib.Point, exp) -> dict[str, Any]:
  """What DIR/<point>/experiment_point.json holds once the point is done (times aside);
  'analysis' is None for a point that is trained only, 'analyses' the extra ones (if any)."""
  mark = {'name': point.name, 'steps': int(point.config.train.steps),
          'analysis': config_lib.to_dict(point.config.analysis) if exp.analyse else None,
          'over_training': bool(exp.over_training)}
  if len(exp.analyses):
    mark['analyses'] = {name: config_lib.to_dict(c.analysis)
                        for name, c in spec_lib.extra_analyses(point, exp).items()}
  return mark


def status(root: str, point: spec_lib.Point, exp) -> str:
  """'done', 'trained' (analysis to do), 'partial' (training to resume) or 'new'."""
  wd = point_dir(root, point)
  mark = workdir_lib.read_optional_json(os.path.join(wd, POINT_MARK)) if os.path.isdir(wd) else None
  expected = expected_mark(point, exp)
  if mark is not None and {k: mark.get(k) for k in expected} == workdir_lib.clean(expected):
    return 'done'
  step = latest_step(wd) if os.path.isdir(wd) else None
  if step is None:
    return 'new'
  return 'trained' if step >= int(point.config.train.steps) else 'partial'


def _timed(fn, *args, **kwargs):
  w, c = time.perf_counter(), time.process_time()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - w, time.process_time() - c


def share_tokenizer(root: str, point: spec_lib.Point, wd: str) -> None:
  """Puts DIR/tokenizer.model (trained here by the first job that needs it) into the point's
  new workdir, so every point reads the same ids. Concurrent jobs each train one and link it
  into place; the first link wins and the others use it."""
  if point.config.data.prepared or os.path.exists(os.path.join(wd, TOKENIZER)):
    return  # prepared shards carry their own tokenizer; a started point keeps its file
  shared = os.path.join(root, TOKENIZER)
  if not os.path.exists(shared):
    from twotower_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
    from twotower_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    log.info('experiment: training the shared tokenizer %s', shared)
    tmp = f'{shared}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    d = point.config.data
    tokenizer_lib.train(corpus_lib.load(d).train_docs, tmp, int(d.vocab_size), d.tokenizer_type)
    try:
      os.link(tmp, shared)
    except FileExistsError:
      pass  # another job's file is in place: use it
    finally:
      os.remove(tmp)
  os.makedirs(wd, exist_ok=True)
  tmp = f'{os.path.join(wd, TOKENIZER)}.tmp-{os.getpid()}'
  shutil.copy2(shared, tmp)
  os.replace(tmp, os.path.join(wd, TOKENIZER))


def train(point: spec_lib.Point, wd: str) -> dict[str, float]:
  """Trains or resumes the point's run to its steps; its wall and CPU seconds (0 if kept)."""
  steps = int(point.config.train.steps)
  done = latest_step(wd)
  if done is not None and done > steps:
    raise spec_lib.ExperimentError(f'{wd} is trained to step {done}, beyond the {steps} steps '
                                   'the experiment asks for; use a new --workdir')
  if done == steps and os.path.exists(workdir_lib.path(wd, workdir_lib.CONFIG_JSON)):
    loop.check_workdir(point.config, wd)  # refuses a finished run of another config
    log.info('experiment: %s is trained (%d steps), kept', point.name, steps)
    return {'train_wall_s': 0.0, 'train_cpu_s': 0.0}
  log.info('experiment: training %s', point.name)
  result, wall, cpu = _timed(loop.train_and_evaluate, point.config, wd)
  if result.get('preempted'):
    raise Stopped(point.name, str(result.get('signal')))
  return {'train_wall_s': wall, 'train_cpu_s': cpu}


def _analyse(point: spec_lib.Point, wd: str, step: int, out_dir: str | None) -> float:
  """One analysis of the point's run at `step` into out_dir (None: DIR/analysis), kept when
  marked with the same settings and step; its wall seconds (0 when kept)."""
  folder = out_dir or workdir_lib.analysis_dir(wd)
  mark = _mark(point, step)
  if _is_marked(folder, mark):
    return 0.0
  config = analysis_runner.load_config(wd, point.config.analysis)
  config.analysis.step = int(step)
  log.info('experiment: analysing %s at step %d', point.name, step)
  _, wall, _ = _timed(analysis_runner.run, config, wd, out_dir)
  workdir_lib.write_json(os.path.join(folder, ANALYSIS_MARK), mark)
  return wall


def _copy_final(wd: str, step: int, mark: dict[str, Any]) -> None:
  """steps/<final>/ holds the final analysis's summary.json and preference.csv (the same
  analysis, not run twice), staged like any analysis folder."""
  root = workdir_lib.analysis_dir(wd)
  target = os.path.join(root, workdir_lib.STEPS_DIR, str(step))
  if _is_marked(target, mark):
    return
  with staging.staged_dir(target) as staged:
    for name in COPIED:
      shutil.copy2(os.path.join(root, name), os.path.join(staged, name))
    workdir_lib.write_json(os.path.join(staged, ANALYSIS_MARK), mark)


def analyse(point: spec_lib.Point, wd: str, over_training: bool) -> dict[str, float]:
  """The final analysis into DIR/analysis, then (over_training) every other kept checkpoint
  into DIR/analysis/steps/<step>/ and over_training.json; the wall seconds spent."""
  final = latest_step(wd)
  wall = _analyse(point, wd, final, None)  # first: it replaces DIR/analysis whole
  if over_training:
    root = workdir_lib.analysis_dir(wd)
    for step in analysis_runner.kept_steps(wd):
      if step == final:
        _copy_final(wd, step, _mark(point, step))
      else:
        wall += _analyse(point, wd, step, os.path.join(root, workdir_lib.STEPS_DIR, str(step)))
    report.write_over_training(root)
  return {'analysis_wall_s': wall}


def run(root: str, exp, points: list[spec_lib.Point], point: spec_lib.Point,
        commit: dict[str, Any]) -> dict[str, Any]:
  """Trains and (exp.analyse) analyses one point, keeping what is done; returns its mark."""
  wd = point_dir(root, point)
  mark_file = os.path.join(wd, POINT_MARK)
  if status(root, point, exp) == 'done':
    log.info('experiment: %s is done, kept', point.name)
    return workdir_lib.read_json(mark_file)
  for dep in spec_lib.references(point, points):
    if status(root, dep, exp) != 'done':
      raise spec_lib.ExperimentError(f'point {point.name} starts from point {dep.name}, which is '
                                     f'not finished; run it first (--point={dep.index})')
  resolved = spec_lib.resolve(point, points, root)
  if exp.shared_tokenizer:
    share_tokenizer(root, resolved, wd)
  times = train(resolved, wd)
  if exp.analyse:
    times.update(analyse(resolved, wd, bool(exp.over_training)))
  for name, config in spec_lib.extra_analyses(resolved, exp).items():
    extra = dataclasses.replace(resolved, config=config)
    times[f'analysis_{name}_wall_s'] = _analyse(extra, wd, latest_step(wd),
                                                os.path.join(wd, f'analysis_{name}'))
  mark = dict(expected_mark(point, exp), commit=commit, seconds=times)
  workdir_lib.write_json(mark_file, mark)
  return workdir_lib.clean(mark)
