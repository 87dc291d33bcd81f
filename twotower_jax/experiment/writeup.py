"""DIR/results.md and DIR/figures/*.png from results.json alone (aggregate.py writes it)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.report import figures
from twotower_jax.report import render
from twotower_jax.report.format import FIG, H, P, TABLE, UL, _finite, ci, num

RESULTS_MD = 'results.md'


def _p(x: Any) -> str:
  return num(x, 4)


def _pooled_cell(pooled: dict[str, Any]) -> list[str]:
  return [f"{num(pooled['estimate'])} {ci(pooled['ci'])}", ci(pooled['ci_hksj']),
          num(pooled['tau2'], 4), f"{_p(pooled['p_greater'])} / {_p(pooled['p_greater_hksj'])}"]


def _control_cell(c: dict[str, Any] | None) -> str:
  if not c:
    return 'n/a'
  cl, cf = c['class'], c['crossfit']
  return (f"prefer p {_p(c['prefer_p'])}; class AUC {num(cl['auc'])} {ci(cl['ci'])}, p "
          f"{_p(cl['p'])}; cross-fit {num(cf['effect'])} {ci(cf['ci'])}")


def _sentence(group: str, est: str, e: dict[str, Any], alpha: float) -> str:
  """What the group's tests say, and only that."""
  pooled, split, stab = e['pooled'], e['seeds_with_split'], e['stability']
  holds = _finite(pooled['p_greater']) and pooled['p_greater'] < alpha
  holds_hk = _finite(pooled['p_greater_hksj']) and pooled['p_greater_hksj'] < alpha
  verdict = ('replicates across item halves, consistently over the points (DL p < alpha'
             + (', and so does the HKSJ interval' if holds_hk else '; not by the wider HKSJ '
                'interval') + ')') if holds else 'is not shown to replicate across item halves'
  return (f'**{group} / {est}**: the function-vs-content-word effect {verdict}: '
          f"{num(pooled['estimate'])} {ci(pooled['ci'])} over {pooled['k']} points; "
          f"{split['n']} of {split['of']} show a split on their own (class test p < {alpha:g}); "
          f"cross-seed Spearman of the per-item preference {num(stab['mean'])} {ci(stab['ci'])}.")


def _fig_pooled(root: str, res: dict[str, Any]) -> str | None:
  rows = []  # (label, points [(effect, ci)], pooled, control)
  for g, gr in res['groups'].items():
    for est, e in gr['estimators'].items():
      pts = [res_pt['analysis']['estimators'][est]['crossfit'] for res_pt in res['points']
             if res_pt['name'] in e['pooled']['points']]
      ctrl = (e.get('control') or {}).get('crossfit')
      rows.append((f'{g} / {est}', pts, e['pooled'], ctrl))
  if not rows:
    return None
  fig, ax = figures.new_fig(6.5, 0.5 + 0.55 * len(rows))
  ax = ax[0, 0]
  for y, (label, pts, pooled, ctrl) in enumerate(rows):
    for j, c in enumerate(pts):
      if _finite(c['effect']) and _finite(c['ci'][0]):
        yy = -y + 0.15 + 0.3 * (j + 1) / (len(pts) + 1)  # the points above the pooled row
        ax.errorbar([c['effect']], [yy], xerr=[[c['effect'] - c['ci'][0]],
                                                      [c['ci'][1] - c['effect']]],
                    fmt='o', ms=3, color=figures.TOWER_COLORS[0], alpha=0.6, lw=0.8)
    if _finite(pooled['estimate']):
      ax.errorbar([pooled['estimate']], [-y], xerr=[[pooled['estimate'] - pooled['ci'][0]],
                                                    [pooled['ci'][1] - pooled['estimate']]],
                  fmt='D', ms=5, color='k', lw=1.5, label='pooled (DL)' if y == 0 else None)
    if ctrl and _finite(ctrl['effect']) and _finite(ctrl['ci'][0]):
      ax.errorbar([ctrl['effect']], [-y - 0.25], xerr=[[ctrl['effect'] - ctrl['ci'][0]],
                                                       [ctrl['ci'][1] - ctrl['effect']]],
                  fmt='x', ms=4, color='grey', lw=0.8, label='one-tower control' if y == 0 else None)
  ax.axvline(0, color='grey', lw=0.8, ls=':')
  ax.set_yticks([-y for y in range(len(rows))], [r[0] for r in rows], fontsize=8)
  ax.set_xlabel('cross-fitted class effect o (0 = none; blue: each point, 95% bootstrap CI)',
                fontsize=8)
  ax.legend(fontsize=7, loc='best')
  return figures.save(fig, root, 'pooled')


def _fig_over_training(root: str, res: dict[str, Any]) -> str | None:
  ests = sorted({est for gr in res['groups'].values() for est, e in gr['estimators'].items()
                 if e['over_training']})
  if not ests:
    return None
  fig, axes = figures.new_fig(3.6 * len(ests), 3.0, 1, len(ests))
  for i, est in enumerate(ests):
    ax = axes[0, i]
    for j, (g, gr) in enumerate(res['groups'].items()):
      rows = (gr['estimators'].get(est) or {}).get('over_training') or []
      if rows:
        ax.plot([r['step'] for r in rows], [r['oriented_auc'] for r in rows], '-o', ms=3,
                color=figures.TOWER_COLORS[j % len(figures.TOWER_COLORS)], label=g)
    ax.axhline(0.5, color='grey', lw=0.8, ls=':')
    ax.set_title(f'{est}: class AUC oriented by the final step', fontsize=9)
    ax.set_xlabel('training step', fontsize=8)
    ax.legend(fontsize=7)
  return figures.save(fig, root, 'over_training')


def _fig_loss(root: str, res: dict[str, Any]) -> str | None:
  groups = list(res['groups'])
  if not groups:
    return None
  fig, axes = figures.new_fig(3.4 * len(groups), 3.0, 1, len(groups))
  for i, g in enumerate(groups):
    ax = axes[0, i]
    pts = [p for p in res['points'] if p['group'] == g and p['eval_curve']]
    for j, p in enumerate(pts):
      curve = np.asarray(p['eval_curve'], float)
      ax.plot(curve[:, 0], curve[:, 1], '--' if p['kind'] == 'control' else '-',
              color=figures.TOWER_COLORS[j % len(figures.TOWER_COLORS)], label=p['name'])
    ax.set_title(f'{g}: eval loss', fontsize=9)
    ax.set_xlabel('training step', fontsize=8)
    ax.legend(fontsize=6)
  return figures.save(fig, root, 'eval_loss')


def markdown(res: dict[str, Any], figs: dict[str, str | None], workdir: str) -> str:
  s = res['settings']
  alpha = s['alpha']
  blocks = [H(1, f"Experiment {res['experiment']}"),
            P(f"Commit `{res['commit']}`{' (with uncommitted changes)' if res['dirty'] else ''}; "
              f'DIR = `{workdir}`. Commands (one command, or one job per point then the '
              'aggregation):'),
            UL([f"`{res['commands'][k]}`" for k in ('all', 'point', 'aggregate')]),
            H(2, f"The answer per {s['group_by']}"),
            P('Pooled: the cross-fitted class effect o of each point (function vs content words, '
              'the adjusted AUC of one half of the items oriented by the other half; 0 under the '
              'null), DerSimonian-Laird random effects over the points: estimate [95% CI], the '
              'Hartung-Knapp-Sidik-Jonkman interval (t, k - 1 df), tau^2, one-sided p (effect '
              f'> 0; DL / HKSJ). Split: points whose own class test has p < {alpha:g}. Primary: '
              f"points whose primary test ({s['primary']}) is significant. Stability: cross-"
              'seed Spearman of the per-item preference, alignment chosen on the other half of '
              'the items (mean over pairs, 95% bootstrap CI over items). docs/EXPERIMENTS.md.')]
  rows, sentences = [], []
  for g, gr in res['groups'].items():
    for est, e in gr['estimators'].items():
      rows.append([g, est, str(e['pooled']['k']), *_pooled_cell(e['pooled']),
                   f"{e['seeds_with_split']['n']}/{e['seeds_with_split']['of']}",
                   f"{e['primary_significant']['n']}/{e['primary_significant']['of']}",
                   f"{num(e['stability']['mean'])} {ci(e['stability']['ci'])}",
                   _control_cell(e['control'])])
      sentences.append(_sentence(g, est, e, alpha))
  blocks += [TABLE([s['group_by'], 'estimator', 'points', 'pooled effect [95% CI]',
                    'HKSJ 95% CI', 'tau^2', 'p (DL / HKSJ)', 'split', 'primary',
                    'stability [95% CI]', 'one-tower control'], rows), UL(sentences)]
  if figs.get('pooled'):
    blocks.append(FIG(figs['pooled'], 'Cross-fitted class effect per point (blue), pooled '
                      '(black diamond, DL 95% CI) and the one-tower control (grey).'))
  blocks += [H(2, 'Points'),
             P('Eval loss: the run\'s last eval; last-quarter change: its relative fall from the '
               f"last eval at or before 3/4 of the steps (levelled off below "
               f"{s['plateau_tolerance']:g})."),
             TABLE(['point', 'kind', 'steps', 'eval loss', 'last-quarter change',
                    'levelled off', 'primary p', 'estimator: class AUC [95% CI], p, direction; '
                    'cross-fit o [95% CI]'], [_point_row(p) for p in res['points']])]
  if figs.get('eval_loss'):
    blocks.append(FIG(figs['eval_loss'], 'Eval loss against the training step (dashed: the '
                      'one-tower control).'))
  ot = [[g, est, str(r['step']), str(r['n_points']), num(r['oriented_auc']), _p(r['class_p'])]
        for g, gr in res['groups'].items() for est, e in gr['estimators'].items()
        for r in e['over_training']]
  if ot:
    blocks += [H(2, 'Over training'),
               P('Per checkpoint, averaged over the points: the adjusted class AUC oriented by '
                 "each point's final direction (so the last step is >= 0.5 by construction: read "
                 'the shape, not the level) and the class test p of each step (no multiplicity '
                 'correction).'),
               TABLE([s['group_by'], 'estimator', 'step', 'points', 'oriented AUC', 'mean p'], ot)]
    if figs.get('over_training'):
      blocks.append(FIG(figs['over_training'], 'Oriented class AUC against the training step.'))
  return render.to_markdown(blocks)


def _point_row(p: dict[str, Any]) -> list[str]:
  pl, prim = p['plateau'], p['analysis']['primary']
  cells = '; '.join(
      f"{est}: {num(e['class']['auc'])} {ci(e['class']['ci'])}, {_p(e['class']['p'])}, "
      f"{e['class']['direction'] or 'n/a'}; o {num(e['crossfit']['effect'])} "
      f"{ci(e['crossfit']['ci'])}" for est, e in p['analysis']['estimators'].items())
  return [p['name'], p['kind'], str(p['steps']), num(pl['final_loss'], 4),
          num(pl['last_quarter_change'], 4),
          {True: 'yes', False: 'no', None: 'n/a'}[pl['levelled_off']],
          _p(prim['p']) if prim else 'n/a', cells]


def write(root: str, res: dict[str, Any]) -> dict[str, Any]:
  """Writes results.md and figures/*.png under root; returns their paths."""
  os.makedirs(os.path.join(root, workdir_lib.FIG_DIR), exist_ok=True)
  figs = {'pooled': _fig_pooled(root, res), 'over_training': _fig_over_training(root, res),
          'eval_loss': _fig_loss(root, res)}
  path = os.path.join(root, RESULTS_MD)
  workdir_lib.write_text(path, markdown(res, figs, root))
  return {'results_md': path, 'figures': figs}
