"""Preference over training: the headline statistics of every analysed checkpoint against
its step, from DIR/analysis/steps/<step>/summary.json alone (written by analyze --steps)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.report import figures
from twotower_jax.report import render
from twotower_jax.report.format import FIG, H, P, TABLE, _finite, ci, count, num


def _p(block: dict[str, Any]) -> Any:
  """A class block's test p (summaries before the class test: its shuffled-tower p)."""
  return block.get('p', (block.get('null') or {}).get('p'))


def collect(analysis_dir: str) -> list[dict[str, Any]]:
  """One row per analysed step: per estimator the class and planted AUC with their tests,
  the bimodality against its control, and the agreement between estimators."""
  root = os.path.join(analysis_dir, workdir_lib.STEPS_DIR)
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  rows = []
  for step in steps:
    summary = workdir_lib.read_optional_json(
        os.path.join(root, str(step), workdir_lib.SUMMARY_JSON))
    if summary is None:
      continue
    per = {}
    for est, ps in (summary.get('per_estimator') or {}).items():
      ce, pl = ps.get('class_enrichment') or {}, ps.get('planted') or {}
      per[est] = {'n_items': ps.get('n_items'), 'class_auc': ce.get('auc'),
                  'class_ci': ce.get('ci'), 'class_p': _p(ce),
                  'planted_auc': pl.get('auc'), 'planted_ci': pl.get('ci'),
                  'planted_p': _p(pl),
                  'bimodality': ps.get('bimodality'),
                  'control_bimodality': (ps.get('control') or {}).get('bimodality')}
    rows.append({'step': step, 'eval_loss': summary.get('eval_loss'), 'per_estimator': per,
                 'agreement': {k: v.get('spearman')
                               for k, v in (summary.get('agreement') or {}).items()}})
  return rows


def _figure(analysis_dir: str, rows: list[dict[str, Any]]) -> str | None:
  ests = sorted({e for r in rows for e in r['per_estimator']})
  if not rows or not ests:
    return None
  planted = any(_finite(r['per_estimator'].get(e, {}).get('planted_auc')) for r in rows
                for e in ests)
  panels = ['class_auc'] + (['planted_auc'] if planted else []) + ['bimodality', 'agreement']
  fig, axes = figures.new_fig(3.4 * len(panels), 3.0, 1, len(panels))
  steps = [r['step'] for r in rows]
  for i, panel in enumerate(panels):
    ax = axes[0, i]
    if panel == 'agreement':
      for j, pair in enumerate(sorted({k for r in rows for k in r['agreement']})):
        ax.plot(steps, [r['agreement'].get(pair, np.nan) for r in rows], '-o', ms=3,
                color=figures.TOWER_COLORS[j % len(figures.TOWER_COLORS)], label=pair)
      ax.set_title('agreement (Spearman)', fontsize=9)
    else:
      for j, est in enumerate(ests):
        color = figures.TOWER_COLORS[j % len(figures.TOWER_COLORS)]
        vals = [r['per_estimator'].get(est, {}).get(panel) for r in rows]
        ax.plot(steps, [v if _finite(v) else np.nan for v in vals], '-o', ms=3, color=color,
                label=est)
        if panel == 'bimodality':
          ctrl = [r['per_estimator'].get(est, {}).get('control_bimodality') for r in rows]
          ax.plot(steps, [v if _finite(v) else np.nan for v in ctrl], ':', color=color)
      if panel != 'bimodality':
        ax.axhline(0.5, color='grey', lw=0.8, ls=':')
      ax.set_title({'class_auc': 'function-word AUC (adjusted)',
                    'planted_auc': 'planted-class AUC (adjusted)',
                    'bimodality': 'bimodality (dotted: control)'}[panel], fontsize=9)
    ax.set_xlabel('training step', fontsize=8)
    ax.legend(fontsize=6)
  return figures.save(fig, analysis_dir, 'over_training')


def write_over_training(analysis_dir: str) -> dict[str, Any]:
  """Writes over_training.json, over_training.md and figures/over_training.png."""
  rows = collect(analysis_dir)
  workdir_lib.write_json(os.path.join(analysis_dir, workdir_lib.OVER_TRAINING_JSON),
                         {'steps': rows})
  os.makedirs(os.path.join(analysis_dir, workdir_lib.FIG_DIR), exist_ok=True)
  fig = _figure(analysis_dir, rows)
  blocks = [H(1, 'Tower preference over training'),
            P('Each checkpoint analysed on its own (full reports in steps/<step>/). The AUCs are adjusted '
              'for frequency and item loss; p is the class test of each step '
              '(not adjusted for multiplicity: each step is its own analysis, and testing many steps multiplies '
              'the chances of a false positive; read the curve, not a single small p).')]
  if fig:
    blocks.append(FIG(fig, 'Class AUC, planted-class AUC (planted corpora), bimodality and '
                      'agreement between estimators against the training step.'))
  table = []
  for r in rows:
    for est, v in sorted(r['per_estimator'].items()):
      table.append([count(r['step']), num(r['eval_loss']), est, count(v['n_items']),
                    f"{num(v['class_auc'])} {ci(v['class_ci'])}", num(v['class_p']),
                    f"{num(v['planted_auc'])} {ci(v['planted_ci'])}",
                    f"{num(v['bimodality'])} / {num(v['control_bimodality'])}"])
  blocks.append(TABLE(['step', 'eval loss', 'estimator', 'items', 'class AUC [95% CI]',
                       'class test p',
                       'planted AUC [95% CI]', 'bimodality / control'], table))
  path = os.path.join(analysis_dir, workdir_lib.OVER_TRAINING_MD)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(render.to_markdown(blocks))
  return {'steps': rows, 'report_md': path, 'figure': fig}
