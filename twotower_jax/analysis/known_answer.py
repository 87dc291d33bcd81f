"""Known-answer validation: models whose tower split is known by construction.

On the planted language (docs/PLANTED.md) five runs go under DIR:
- `syntax`, `topic`: one tower each, the loss only on syntax (resp. topic) targets
  (data.planted_loss_class);
- `all`: one tower, every target;
- `known`: two towers, tower 0 from `syntax` and tower 1 from `topic`
  (model.init_towers), frozen (train.trainable); only the latent gate's prior and the
  output bias train, on every target. Syntax items belong to tower 0 by construction;
- `null`: two towers, both from `all`, frozen the same way: the towers are identical,
  and with a zero-initialised prior (model.latent.uniform_init) and no dropout the
  model stays exactly symmetric under swapping them, so no item can prefer a tower.

Every run uses gate=latent (so the `gate` estimator applies) and per-tower tables.
Then the analysis (analysis.runner) runs every registered estimator on `known` and
`null`; the checks: on `known` each estimator's planted-class AUC >= min_auc (syntax
-> tower 0); on `null` none reports a split (a split: p < alpha against the
shuffled-tower control AND an AUC interval that excludes the control's mean).
DIR/validation.json and DIR/validation.md hold the results. A rerun resumes: finished
runs and analyses are kept.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import estimators as est_lib
from twotower_jax.analysis import runner
from twotower_jax.data import planted
from twotower_jax.train import checkpoints
from twotower_jax.train import loop

log = logging.getLogger('twotower_jax')

SOURCES = (('syntax', 'syntax'), ('topic', 'topic'), ('all', ''))  # (run, planted_loss_class)
GATED = (('known', ('syntax', 'topic')), ('null', ('all', 'all')))  # (run, tower sources)
# What trains in the composed models: the latent gate's prior (its input LayerNorm and
# Dense) and the shared output bias. Towers, tables and each tower's own head stay frozen.
TRAINABLE = '^gate/(ln_in|gate)/|^embed/output_bias$'
VALIDATION_JSON = 'validation.json'
VALIDATION_MD = 'validation.md'
_ANALYSIS_MARK = 'validate_analysis.json'  # in DIR/<run>/analysis/: what it was run with


class ValidationError(errors.UserError):
  """A config the validation cannot use; the message says what to change."""


def run_configs(base: ml_collections.ConfigDict, workdir: str,
                gate_steps: int) -> dict[str, ml_collections.ConfigDict]:
  """The five runs' configs, derived from `base` (a planted config)."""
  d = base.data
  if d.source != 'planted' or d.tokenizer_type != 'word':
    raise ValidationError(f'validate needs the planted language with the word tokenizer '
                          f'(configs/planted.py); this config has data.source={d.source!r}, '
                          f'data.tokenizer_type={d.tokenizer_type!r}')
  if d.planted_loss_class or base.model.init_towers or base.train.trainable:
    raise ValidationError('validate sets data.planted_loss_class, model.init_towers and '
                          'train.trainable itself; leave them at their defaults')
  if gate_steps < 1:
    raise ValidationError(f'--gate_steps={gate_steps} must be >= 1')
  out = {}
  for name, loss_class in SOURCES:
    c = _common(base)
    c.model.n_towers, c.mesh.tower = 1, 1
    c.data.planted_loss_class = loss_class
    out[name] = c
  for name, (src0, src1) in GATED:
    c = _common(base)
    c.model.n_towers = 2
    c.mesh.tower = base.mesh.tower if base.mesh.tower in (1, 2) else 1
    c.model.dropout = 0.0  # frozen towers run as they are analysed (and stay symmetric)
    c.model.init_towers = ','.join(os.path.join(workdir, s) + ':0' for s in (src0, src1))
    c.train.trainable = TRAINABLE
    t = c.train
    t.steps = gate_steps
    t.eval_every, t.checkpoint_every = min(t.eval_every, gate_steps), min(t.checkpoint_every,
                                                                         gate_steps)
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(gate_steps // 10, 1))
    out[name] = c
  return out


def _common(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = config_lib.from_dict(config_lib.to_dict(base))
  c.model.gate = 'latent'
  c.model.embedding.mode = 'per_tower'
  c.model.latent.uniform_init = True
  return c


def _latest_step(workdir: str) -> int | None:
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


def train_all(configs: dict[str, ml_collections.ConfigDict], workdir: str,
              previous: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Trains (or resumes, or keeps) every run; per run its step, final eval and times."""
  runs = {}
  first_tok = workdir_lib.path(os.path.join(workdir, SOURCES[0][0]), workdir_lib.TOKENIZER)
  for name, config in configs.items():
    wd = os.path.join(workdir, name)
    if name != SOURCES[0][0]:  # one tokenizer for all runs: token ids (and sha256) match
      os.makedirs(wd, exist_ok=True)
      if not os.path.exists(workdir_lib.path(wd, workdir_lib.TOKENIZER)):
        shutil.copyfile(first_tok, workdir_lib.path(wd, workdir_lib.TOKENIZER))
    if _latest_step(wd) == config.train.steps and os.path.exists(
        workdir_lib.path(wd, workdir_lib.CONFIG_JSON)):
      loop.check_workdir(config, wd)
      log.info('validate: %s is trained (%d steps), kept', name, config.train.steps)
      runs[name] = dict(previous.get(name, {}), step=config.train.steps, eval=_last_eval(wd))
      continue
    log.info('validate: training %s in %s', name, wd)
    result, wall, cpu = _timed(loop.train_and_evaluate, config, wd)
    if result.get('preempted'):
      raise ValidationError(f'stopped while training {name}; rerun the same command to resume')
    runs[name] = {'step': result['step'], 'eval': result['eval'], 'train_wall_s': wall,
                  'train_cpu_s': cpu}
  return runs


def analyse(workdir: str, analysis: ml_collections.ConfigDict) -> tuple[dict, float, float]:
  """(summary.json of the run in `workdir`, wall s, CPU s); kept when already analysed with
  the same settings at the same checkpoint (then the times are 0)."""
  config = runner.load_config(workdir, analysis)
  mark_file = os.path.join(workdir_lib.analysis_dir(workdir), _ANALYSIS_MARK)
  mark = {'analysis': config_lib.to_dict(config.analysis), 'step': _latest_step(workdir)}
  summary_file = os.path.join(workdir_lib.analysis_dir(workdir), workdir_lib.SUMMARY_JSON)
  if os.path.exists(mark_file) and os.path.exists(summary_file):
    if workdir_lib.read_json(mark_file) == workdir_lib.clean(mark):
      log.info('validate: %s is analysed, kept', workdir)
      return workdir_lib.read_json(summary_file), 0.0, 0.0
  summary, wall, cpu = _timed(runner.run, config, workdir)
  workdir_lib.write_json(mark_file, mark)
  return summary, wall, cpu


def planted_result(summary: dict, name: str) -> dict[str, Any] | None:
  """summary.json's planted-class block of estimator `name` (None: not analysed)."""
  entry = summary.get('per_estimator', {}).get(name)
  return None if entry is None else entry.get('planted')


def class_means(workdir: str, min_count: int) -> dict[str, dict[str, list[float]]]:
  """Per estimator and planted class, each tower's value averaged over the class's items
  (count >= min_count): where the AUC comes from (e.g. a tower whose removal hurts both
  classes)."""
  cols = workdir_lib.read_preferences(os.path.join(workdir_lib.analysis_dir(workdir),
                                                   workdir_lib.PREFERENCE_CSV))
  cls = np.array([int(c) if c.lstrip('-').isdigit() else -1
                  for c in cols.get('planted_class', [''] * len(cols['count']))])
  keep = cols['count'] >= min_count
  out = {}
  for est in cols['_estimators']:
    values_IxN = workdir_lib.tower_values(cols, est)
    out[est] = {name: np.nanmean(values_IxN[keep & (cls == c)], axis=0).tolist()
                for c, name in enumerate(planted.CLASS_NAMES) if np.any(keep & (cls == c))}
  return out


def judge(model: str, est: str, planted: dict | None, min_auc: float,
          alpha: float) -> dict[str, Any]:
  """One check: known -> AUC >= min_auc; null -> no split against the control."""
  check = {'model': model, 'estimator': est, 'name': f'{model}/{est}'}
  if planted is None:
    return dict(check, passed=False, why='not analysed (estimator skipped or missing)')
  auc, (lo, hi) = planted['auc'], planted['ci']
  null = planted.get('null') or {}
  p, centre = null.get('p', math.nan), null.get('null_mean', math.nan)
  check.update(auc=auc, ci=[lo, hi], p=p, control_mean=centre, n_syntax=planted['n_syntax'],
               n_topic=planted['n_topic'])
  if model == 'known':
    ok = math.isfinite(auc) and auc >= min_auc
    why = f'AUC {auc:.3f} {">=" if ok else "<"} {min_auc}'
  else:
    contains = math.isfinite(centre) and lo <= centre <= hi
    split = (math.isfinite(p) and p < alpha) and not contains
    undefined = not math.isfinite(p) and not contains
    ok = not split and not undefined
    why = (f'p {p:.3f} vs alpha {alpha}; AUC CI [{lo:.3f}, {hi:.3f}] '
           f'{"contains" if contains else "excludes"} the control mean {centre:.3f}')
  return dict(check, passed=bool(ok), why=why)


def run(base: ml_collections.ConfigDict, workdir: str, gate_steps: int = 300,
        min_auc: float = 0.95, alpha: float = 0.05) -> dict[str, Any]:
  """Trains, analyses and checks; writes DIR/validation.json and .md; returns the result."""
  workdir = os.path.abspath(workdir)
  configs = run_configs(base, workdir, gate_steps)
  os.makedirs(workdir, exist_ok=True)
  out_file = os.path.join(workdir, VALIDATION_JSON)
  previous = workdir_lib.read_json(out_file) if os.path.exists(out_file) else {}
  t_wall, t_cpu = time.perf_counter(), time.process_time()
  runs = train_all(configs, workdir, previous.get('runs', {}))
  analysis = ml_collections.ConfigDict(base.analysis.to_dict())
  analysis.estimators = ','.join(sorted(est_lib.ESTIMATORS))  # every registered estimator
  checks = []
  for name, _ in GATED:
    summary, wall, cpu = analyse(os.path.join(workdir, name), analysis)
    if wall:
      runs[name].update(analysis_wall_s=wall, analysis_cpu_s=cpu)
    else:
      for k in ('analysis_wall_s', 'analysis_cpu_s'):
        if k in previous.get('runs', {}).get(name, {}):
          runs[name][k] = previous['runs'][name][k]
    runs[name]['eval_loss_scored'] = summary.get('eval_loss')
    means = class_means(os.path.join(workdir, name), int(analysis.min_count))
    for est in sorted(est_lib.ESTIMATORS):
      check = judge(name, est, planted_result(summary, est), min_auc, alpha)
      checks.append(dict(check, class_means=means.get(est, {})))
  failed = [c for c in checks if not c['passed']]
  result = {'workdir': workdir, 'passed': not failed, 'failed': [c['name'] for c in failed],
            'min_auc': min_auc, 'alpha': alpha, 'gate_steps': gate_steps,
            'trainable': TRAINABLE, 'runs': runs, 'checks': checks,
            'this_call': {'wall_s': time.perf_counter() - t_wall,
                          'cpu_s': time.process_time() - t_cpu},
            'config': config_lib.to_dict(base)}
  workdir_lib.write_json(out_file, result)
  with open(os.path.join(workdir, VALIDATION_MD), 'w') as f:
    f.write(markdown(result))
  return result


def _num(x, fmt='.3f') -> str:
  return 'n/a' if x is None or not math.isfinite(float(x)) else format(float(x), fmt)


def markdown(result: dict[str, Any]) -> str:
  """validation.md: the verdict, the per-estimator table and the runs."""
  lines = ['# Known-answer validation', '',
           f'**{"PASSED" if result["passed"] else "FAILED: " + ", ".join(result["failed"])}**',
           '', f'Known-answer model: every estimator should give the planted-class AUC >= '
           f'{result["min_auc"]} (syntax items lean to tower 0). Null model (identical towers): '
           f'no estimator should report a split (p < {result["alpha"]} against the '
           'shuffled-tower control with an AUC interval that excludes the control mean).', '',
           '| model | estimator | AUC [95% CI] | control mean | p | items (syntax/topic) | '
           'check |', '|---|---|---|---|---|---|---|']
  for c in result['checks']:
    if 'auc' not in c:
      lines.append(f'| {c["model"]} | {c["estimator"]} | n/a | | | | fail: {c["why"]} |')
      continue
    lines.append(f'| {c["model"]} | {c["estimator"]} | {_num(c["auc"])} [{_num(c["ci"][0])}, '
                 f'{_num(c["ci"][1])}] | {_num(c["control_mean"])} | {_num(c["p"])} | '
                 f'{c["n_syntax"]}/{c["n_topic"]} | {"pass" if c["passed"] else "FAIL"} |')
  lines += ['', 'Mean value per tower (t0, t1) over the items of each class: the AUC ranks items '
            'by t0 - t1.', '', '| model | estimator | syntax items: t0, t1 | topic items: t0, t1 |',
            '|---|---|---|---|']
  for c in result['checks']:
    means = c.get('class_means') or {}
    cells = [', '.join(_num(v) for v in means.get(k, [])) or 'n/a' for k in ('syntax', 'topic')]
    lines.append(f'| {c["model"]} | {c["estimator"]} | {cells[0]} | {cells[1]} |')
  lines += ['', '| run | steps | eval loss (trained targets) | eval loss (all targets) | '
            'train wall / CPU s | analysis wall / CPU s |', '|---|---|---|---|---|---|']
  for name, r in result['runs'].items():
    ev = r.get('eval') or {}
    lines.append(f'| {name} | {r.get("step")} | {_num(ev.get("loss"))} | '
                 f'{_num(ev.get("loss_all", ev.get("loss")))} | '
                 f'{_num(r.get("train_wall_s"), ".0f")} / {_num(r.get("train_cpu_s"), ".0f")} | '
                 f'{_num(r.get("analysis_wall_s"), ".0f")} / '
                 f'{_num(r.get("analysis_cpu_s"), ".0f")} |')
  return '\n'.join(lines) + '\n'
