"""Eval loss at equal tokens and at equal training FLOPs: aggregation='loss'.

For comparisons of size or method rather than of preference (pondering against wider
models, configs/experiments/pondering.py). Reads each point's metrics.jsonl only: its
parameters and the lowered train step's FLOPs (the 'run' line), its eval-loss curve and
plateau. Per group (a value of group_by, e.g. a variant), over the other axes' points
(seeds): the final eval loss, its difference from the first group's point with the same
other-axis values (same seed), and both again at equal training FLOPs: each curve read,
linearly in the step, at the step where that point has spent the FLOPs of the cheapest
point's whole run. Intervals are Student t 95% over the points (n - 1 df).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from scipy import stats

from twotower_jax import workdir as workdir_lib
from twotower_jax.experiment import runner
from twotower_jax.experiment import spec as spec_lib
# experiment/__init__.py's aggregate() shadows the module's name: import from it by path.
from twotower_jax.experiment.aggregate import eval_curve, plateau
from twotower_jax.report import figures
from twotower_jax.report import render
from twotower_jax.report.format import FIG, H, P, TABLE, UL, _finite, ci, num


def t_interval(values: list[float]) -> dict[str, Any]:
  """Mean, standard deviation and the 95% Student t interval of the mean (NaN below 2)."""
  x = np.asarray([v for v in values if _finite(v)], float)
  nan = float('nan')
  if len(x) == 0:
    return {'n': 0, 'mean': nan, 'sd': nan, 'ci': [nan, nan], 'values': list(values)}
  mean = float(x.mean())
  if len(x) < 2:
    return {'n': 1, 'mean': mean, 'sd': nan, 'ci': [nan, nan], 'values': list(values)}
  sd = float(x.std(ddof=1))
  half = float(stats.t.ppf(0.975, len(x) - 1) * sd / np.sqrt(len(x)))
  return {'n': int(len(x)), 'mean': mean, 'sd': sd, 'ci': [mean - half, mean + half],
          'values': list(values)}


def loss_at(curve: list[list[float]], step: float) -> float:
  """The eval loss at `step`, linear between the curve's evals; NaN outside them."""
  if not curve:
    return float('nan')
  steps, losses = np.asarray(curve, float).T
  if step < steps[0] - 1e-9 or step > steps[-1] + 1e-9:
    return float('nan')
  return float(np.interp(step, steps, losses))


def _run_line(workdir: str) -> dict[str, Any]:
  runs = [m for m in workdir_lib.read_metrics(workdir) if m.get('kind') == 'run']
  if not runs:
    raise spec_lib.ExperimentError(f'{workdir}/metrics.jsonl has no run line; the point did '
                                   'not start training: rerun it')
  return runs[-1]  # a resumed run logs one per start; the step is the same program


def point_record(point: spec_lib.Point, root: str, exp) -> dict[str, Any]:
  wd = runner.point_dir(root, point)
  run = _run_line(wd)
  curve = eval_curve(wd)
  steps = int(point.config.train.steps)
  mark = workdir_lib.read_json(os.path.join(wd, runner.POINT_MARK))
  return {'name': point.name, 'kind': point.kind, 'group': point.group,
          'values': point.values, 'steps': steps, 'commit': mark.get('commit'),
          'params': int(run['params']), 'flops_per_step': float(run['flops_per_step']),
          'tokens_per_step': int(point.config.train.batch_size) * int(point.config.data.seq_len),
          'eval_curve': curve,
          'plateau': plateau(curve, steps, float(exp.plateau_tolerance))}


def pair_key(record: dict[str, Any], group_by: str) -> tuple:
  """A point's values on every axis but group_by: points of two groups with the same key
  (e.g. the same seed) are paired."""
  return tuple(sorted((k, str(v)) for k, v in record['values'].items() if k != group_by))


def header(res: dict[str, Any]) -> list:
  """results.md's first blocks: the experiment, its commit and its commands."""
  return [H(1, f"Experiment {res['experiment']}"),
          P(f"Commit `{res['commit']}`{' (with uncommitted changes)' if res['dirty'] else ''}. "
            'Commands (one command, or one job per point then the aggregation):'),
          UL([f"`{res['commands'][k]}`" for k in ('all', 'point', 'aggregate')])]


def _paired(records: list[dict], ref: list[dict], key: str, group_by: str) -> dict[str, Any]:
  """The difference of `key` from the reference group's point with the same other values."""
  by = {pair_key(r, group_by): r for r in ref}
  pairs = [(r['name'], by[pair_key(r, group_by)]['name'],
            r[key] - by[pair_key(r, group_by)][key])
           for r in records if pair_key(r, group_by) in by]
  out = t_interval([d for _, _, d in pairs])
  out['pairs'] = [[a, b] for a, b, _ in pairs]
  return out


def aggregate(exp, points: list[spec_lib.Point], root: str, provenance: dict[str, Any]
              ) -> dict[str, Any]:
  """results.json's content from the finished points (the caller checked they are)."""
  records = [point_record(p, root, exp) for p in points]
  budget = min(r['flops_per_step'] * r['steps'] for r in records)
  for r in records:
    r['final_loss'] = r['plateau']['final_loss']
    r['budget_step'] = budget / r['flops_per_step']
    r['loss_at_budget'] = loss_at(r['eval_curve'], r['budget_step'])
  group_by = spec_lib.axes(exp)[0][0]
  names = list(dict.fromkeys(r['group'] for r in records))
  ref = [r for r in records if r['group'] == names[0]]
  groups = {}
  for g in names:
    rs = [r for r in records if r['group'] == g]
    groups[g] = {
        'points': [r['name'] for r in rs],
        'params': t_interval([r['params'] for r in rs])['mean'],
        'flops_per_step': t_interval([r['flops_per_step'] for r in rs])['mean'],
        'levelled_off': [r['name'] for r in rs if r['plateau']['levelled_off']],
        'final_loss': t_interval([r['final_loss'] for r in rs]),
        'final_loss_vs_reference': _paired(rs, ref, 'final_loss', group_by),
        'loss_at_budget': t_interval([r['loss_at_budget'] for r in rs]),
        'loss_at_budget_vs_reference': _paired(rs, ref, 'loss_at_budget', group_by)}
  return workdir_lib.clean({
      'experiment': exp.name, 'aggregation': 'loss', **provenance,
      'settings': {'group_by': group_by, 'reference': names[0], 'budget_flops': budget,
                   'plateau_tolerance': float(exp.plateau_tolerance),
                   'interval': 'Student t 95% over the points of a group'},
      'groups': groups, 'points': records})


def _fig(root: str, res: dict[str, Any]) -> str:
  fig, axes = figures.new_fig(9.0, 3.4, 1, 2)
  colors = {g: figures.TOWER_COLORS[i % len(figures.TOWER_COLORS)]
            for i, g in enumerate(res['groups'])}
  seen = set()
  for p in res['points']:
    if not p['eval_curve']:
      continue
    steps, losses = np.asarray(p['eval_curve'], float).T
    label = None if p['group'] in seen else p['group']
    seen.add(p['group'])
    axes[0, 0].plot(steps * p['tokens_per_step'], losses, '-', color=colors[p['group']],
                    label=label, lw=1)
    axes[0, 1].plot(steps * p['flops_per_step'], losses, '-', color=colors[p['group']], lw=1)
  axes[0, 1].axvline(res['settings']['budget_flops'], color='grey', ls=':', lw=0.8)
  axes[0, 0].set_xlabel('training tokens', fontsize=8)
  axes[0, 1].set_xlabel('training FLOPs (dotted: the equal-FLOPs budget)', fontsize=8)
  axes[0, 1].set_xscale('log')
  for ax in axes[0]:
    ax.set_ylabel('eval loss', fontsize=8)
  axes[0, 0].legend(fontsize=7)
  return figures.save(fig, root, 'loss')


def _cell(t: dict[str, Any], digits: int = 4) -> str:
  return f"{num(t['mean'], digits)} {ci(t['ci'], digits)}"


def _sentence(g: str, gr: dict[str, Any], ref: str, what: str, key: str) -> str:
  d = gr[key]
  lo, hi = d['ci']
  if not (_finite(lo) and _finite(hi)):
    return f'{g} vs {ref} {what}: {num(d["mean"], 4)} (no interval: fewer than 2 pairs).'
  side = ('lower' if hi < 0 else 'higher') if (hi < 0 or lo > 0) else None
  verdict = (f'{g} is {side} than {ref} (the interval excludes 0)' if side else
             f'{g} and {ref} are not told apart (the interval holds 0)')
  return f"{what}: {verdict}: {_cell(d)} over {d['n']} paired points."


def writeup(root: str, res: dict[str, Any]) -> dict[str, Any]:
  """results.md and figures/loss.png under root; their paths."""
  os.makedirs(os.path.join(root, workdir_lib.FIG_DIR), exist_ok=True)
  fig = _fig(root, res)
  s, ref = res['settings'], res['settings']['reference']
  ref_flops = res['groups'][ref]['flops_per_step']
  rows, sentences = [], []
  for g, gr in res['groups'].items():
    rows.append([g, str(len(gr['points'])), f"{gr['params']:,.0f}",
                 num(gr['flops_per_step'] / ref_flops, 2), _cell(gr['final_loss']),
                 _cell(gr['final_loss_vs_reference']), _cell(gr['loss_at_budget']),
                 _cell(gr['loss_at_budget_vs_reference']),
                 f"{len(gr['levelled_off'])}/{len(gr['points'])}"])
    if g != ref:
      sentences += [_sentence(g, gr, ref, f'{g}, eval loss at equal tokens',
                              'final_loss_vs_reference'),
                    _sentence(g, gr, ref, f'{g}, eval loss at equal FLOPs',
                              'loss_at_budget_vs_reference')]
  point_rows = [[p['name'], f"{p['params']:,}", f"{p['flops_per_step']:.3g}",
                 num(p['final_loss'], 4), num(p['plateau']['last_quarter_change'], 4),
                 num(p['budget_step'], 0), num(p['loss_at_budget'], 4)] for p in res['points']]
  blocks = [
      *header(res),
      H(2, f"Eval loss per {s['group_by']}"),
      P('Final: each point\'s last eval loss. Equal FLOPs: its eval loss read (linearly between '
        f"evals) where it had spent {s['budget_flops']:.4g} training FLOPs, the cheapest "
        "point's whole run (the lowered step's FLOPs x steps). Differences are paired with the "
        f"{ref} point of the same other axis values (seed). Every interval is a Student t 95% "
        'interval over the points: with 2 points it has 1 degree of freedom and is wide. '
        f"Levelled off: eval loss fell less than {s['plateau_tolerance']:g} (relative) over "
        'the last quarter of training. n/a at equal FLOPs: the budget falls before the first '
        'eval.'),
      TABLE([s['group_by'], 'points', 'parameters', 'FLOPs/step (x ref)', 'final eval loss',
             f'- {ref}', 'eval loss at equal FLOPs', f'- {ref}', 'levelled off'], rows),
      UL(sentences),
      FIG(fig, 'Eval loss against training tokens (left) and training FLOPs (right, log).'),
      H(2, 'Points'),
      TABLE(['point', 'parameters', 'FLOPs/step', 'final eval loss', 'last-quarter change',
             'step at the budget', 'eval loss there'], point_rows)]
  path = os.path.join(root, 'results.md')
  workdir_lib.write_text(path, render.to_markdown(blocks))
  return {'results_md': path, 'figures': {'loss': fig}}
