"""Trains and analyses the validation's runs, keeping what a previous call finished.

A run whose latest complete checkpoint is its last step is kept (its config checked
against the plan); an analysed composed model is kept when its analysis settings and
checkpoint are the ones asked for. Everything else trains or resumes in this process.
Compiled programs go to a persistent cache under DIR (jax's compilation cache): the
validation compiles the same few shapes dozens of times.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import ml_collections

from twotower_jax import config as config_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import runner
from twotower_jax.analysis.validation import plan as plan_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import loop

log = logging.getLogger('twotower_jax')

ANALYSIS_MARK = 'validate_analysis.json'  # in DIR/<run>/analysis/: what it was run with
CACHE_DIR = '.jax_cache'


def use_compile_cache(workdir: str) -> None:
  """jax's persistent compilation cache in DIR/.jax_cache, for every program size."""
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, CACHE_DIR))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def latest_step(workdir: str) -> int | None:
  if not os.path.isdir(checkpoints.directory(workdir)):
    return None
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    return checkpoints.latest_complete_step(mngr)
  finally:
    mngr.close()


def _last_eval(workdir: str) -> dict[str, Any] | None:
  evals = [m for m in workdir_lib.read_metrics(workdir) if m.get('kind') == 'eval']
  return evals[-1] if evals else None


def _timed(fn, *args):
  """(fn(*args), wall seconds, CPU seconds of this process: user + system, all threads)."""
  w, c = time.perf_counter(), time.process_time()
  out = fn(*args)
  return out, time.perf_counter() - w, time.process_time() - c


def train(run: plan_lib.Run, workdir: str, first_of_group: dict[str, str],
          previous: dict[str, Any]) -> dict[str, Any]:
  """Trains (or resumes, or keeps) one run; its step, final eval and times."""
  wd = os.path.join(workdir, run.name)
  tok = workdir_lib.path(wd, workdir_lib.TOKENIZER)
  first = first_of_group.setdefault(run.tokenizer, wd)
  if first != wd and not os.path.exists(tok):  # the group's tokenizer: token ids match
    os.makedirs(wd, exist_ok=True)
    shutil.copyfile(workdir_lib.path(first, workdir_lib.TOKENIZER), tok)
  steps = int(run.config.train.steps)
  if latest_step(wd) == steps and os.path.exists(workdir_lib.path(wd, workdir_lib.CONFIG_JSON)):
    loop.check_workdir(run.config, wd)
    log.info('validate: %s is trained (%d steps), kept', run.name, steps)
    return dict(previous.get(run.name, {}), step=steps, eval=_last_eval(wd))
  log.info('validate: training %s', run.name)
  result, wall, cpu = _timed(loop.train_and_evaluate, run.config, wd)
  if result.get('preempted'):
    raise plan_lib.ValidationError(f'stopped while training {run.name}; rerun the same command '
                                   'to resume')
  return {'step': result['step'], 'eval': result['eval'], 'train_wall_s': wall,
          'train_cpu_s': cpu}


def analyse(run: plan_lib.Run, workdir: str, analysis: ml_collections.ConfigDict
            ) -> tuple[dict, float, float]:
  """(summary.json of a composed run, wall s, CPU s); kept when already analysed with the
  same settings at the same checkpoint (then the times are 0)."""
  wd = os.path.join(workdir, run.name)
  config = runner.load_config(wd, analysis)
  out = workdir_lib.analysis_dir(wd)
  mark_file = os.path.join(out, ANALYSIS_MARK)
  mark = {'analysis': config_lib.to_dict(config.analysis), 'step': latest_step(wd)}
  summary_file = os.path.join(out, workdir_lib.SUMMARY_JSON)
  if os.path.exists(mark_file) and os.path.exists(summary_file):
    if workdir_lib.read_json(mark_file) == workdir_lib.clean(mark):
      log.info('validate: %s is analysed, kept', run.name)
      return workdir_lib.read_json(summary_file), 0.0, 0.0
  log.info('validate: analysing %s', run.name)
  summary, wall, cpu = _timed(runner.run, config, wd)
  workdir_lib.write_json(mark_file, mark)
  return summary, wall, cpu
