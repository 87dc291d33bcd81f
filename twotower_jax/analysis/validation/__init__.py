"""Known-answer validation of the class test: python -m twotower_jax.validate.

plan.py lists the runs (the graded ladder and the replicated nulls), execute.py trains and
analyses them (resuming), checks.py judges them, writeup.py writes DIR/validation.md,
validation.json and the figures. docs/ANALYSIS.md, "Known-answer validation".
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections

from twotower_jax import config as config_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import estimators as est_lib
from twotower_jax.analysis.validation import checks as checks_lib
from twotower_jax.analysis.validation import execute
from twotower_jax.analysis.validation import plan as plan_lib
from twotower_jax.analysis.validation import writeup
from twotower_jax.analysis.validation.plan import Settings, ValidationError  # noqa: F401

VALIDATION_JSON, VALIDATION_MD = writeup.VALIDATION_JSON, writeup.VALIDATION_MD


def _check_workdir(workdir: str) -> None:
  """DIR must be new, empty or an earlier validation: never a training run's workdir."""
  if os.path.isfile(workdir):
    raise ValidationError(f'--workdir={workdir} is a file; give a directory for the runs')
  if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_JSON)):
    raise ValidationError(f'--workdir={workdir} holds a training run (config.json); give the '
                          'validation a directory of its own')
  if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.exists(
      os.path.join(workdir, VALIDATION_JSON)) and not os.path.isdir(
          os.path.join(workdir, 'ladder')):
    raise ValidationError(f'--workdir={workdir} holds files that are not a validation; give a '
                          'new or empty directory')


def run(base: ml_collections.ConfigDict, workdir: str,
        settings: Settings = Settings()) -> dict[str, Any]:
  """Trains, analyses and checks every run; writes DIR/validation.{json,md}; returns them."""
  workdir = os.path.abspath(workdir)
  runs = plan_lib.runs(base, workdir, settings)
  _check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  execute.use_compile_cache(workdir)
  out_file = os.path.join(workdir, VALIDATION_JSON)
  previous = workdir_lib.read_optional_json(out_file) or {}
  prev_runs = previous.get('runs', {})
  t_wall, t_cpu = time.perf_counter(), time.process_time()
  estimators = sorted(est_lib.ESTIMATORS)
  analysis = ml_collections.ConfigDict(base.analysis.to_dict())
  analysis.estimators = ','.join(estimators)
  analysis.primary = plan_lib.PRIMARY
  analysis.control_class_tests = settings.control_tests
  first_of_group: dict[str, str] = {}
  records, results = {}, []
  for r in runs:
    records[r.name] = execute.train(r, workdir, first_of_group, prev_runs)
    if not r.composed:
      continue
    own = ml_collections.ConfigDict(analysis.to_dict())
    if r.config.model.tower_type == 'mlm':
      own.mask_draws = plan_lib.MLM_MASK_DRAWS
    summary, wall, cpu = execute.analyse(r, workdir, own)
    rec = records[r.name]
    if wall:
      rec.update(analysis_wall_s=wall, analysis_cpu_s=cpu)
    else:
      for k in ('analysis_wall_s', 'analysis_cpu_s'):
        if k in prev_runs.get(r.name, {}):
          rec[k] = prev_runs[r.name][k]
    rec['eval_loss_scored'] = summary.get('eval_loss')
    results.append({'name': r.name, 'group': r.group, 'summary': summary})
  checks = checks_lib.mark_required(
      checks_lib.ladder_checks(results, estimators, settings.alpha) +
      checks_lib.null_checks(results, estimators, settings.alpha, settings.max_fpr),
      plan_lib.PRIMARY.split('/')[0])
  failed = [c['name'] for c in checks if c['required'] and not c['passed']]
  result = {'workdir': workdir, 'passed': not failed, 'failed': failed,
            'primary': plan_lib.PRIMARY,
            'secondary_failed': [c['name'] for c in checks
                                 if not c['required'] and not c['passed']],
            'alpha': settings.alpha, 'max_fpr': settings.max_fpr,
            'settings': {k: list(v) if isinstance(v, tuple) else v
                         for k, v in settings.__dict__.items()},
            'trainable': plan_lib.TRAINABLE, 'runs': records, 'checks': checks,
            'this_call': {'wall_s': time.perf_counter() - t_wall,
                          'cpu_s': time.process_time() - t_cpu},
            'config': config_lib.to_dict(base)}
  writeup.write(workdir, result)
  return result
