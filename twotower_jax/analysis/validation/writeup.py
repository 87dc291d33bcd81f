"""validation.md, validation.json and the figures: the ladder and the p-value calibration."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.report import figures

VALIDATION_JSON = 'validation.json'
VALIDATION_MD = 'validation.md'
FIG_DIR = 'figures'


def _num(x, fmt='.3f') -> str:
  return 'n/a' if x is None or not math.isfinite(float(x)) else format(float(x), fmt)


def _ci(pair, fmt='.3f') -> str:
  return f'[{_num(pair[0], fmt)}, {_num(pair[1], fmt)}]' if pair and len(pair) == 2 else 'n/a'


def ladder_figure(workdir: str, checks: list[dict[str, Any]]) -> str | None:
  """Split strength against w, one panel per ladder and composition, one line per estimator."""
  ladders = [c for c in checks if c['name'].startswith('ladder/') and len(c.get('rungs', [])) > 1]
  if not ladders:
    return None
  panels = sorted({c['name'].rsplit('/', 1)[0] for c in ladders})
  ests = sorted({c['name'].rsplit('/', 1)[1] for c in ladders})  # one colour each, every panel
  fig, axes = figures.new_fig(3.6 * len(panels), 3.2, 1, len(panels))
  for i, panel in enumerate(panels):
    ax = axes[0, i]
    for c in (c for c in ladders if c['name'].startswith(panel + '/')):
      j = ests.index(c['name'].rsplit('/', 1)[1])
      rows = [r for r in c['rungs'] if r['strength'] is not None]
      w = np.array([r['w'] for r in rows])
      auc = np.array([r['strength'] for r in rows])
      lo = np.array([r['strength_ci'][0] for r in rows])
      hi = np.array([r['strength_ci'][1] for r in rows])
      color = figures.TOWER_COLORS[j % len(figures.TOWER_COLORS)]
      ax.errorbar(w + 0.004 * j, auc, yerr=[auc - lo, hi - auc], fmt='-o', ms=3, capsize=2,
                  color=color, label=c['name'].rsplit('/', 1)[1])
    ax.axhline(0.5, color='grey', lw=0.8, ls=':')
    ax.set_title(panel.replace('ladder/', ''), fontsize=9)
    ax.set_xlabel('w (class weight of the sources)')
    ax.set_ylabel('split strength L')
    ax.legend(fontsize=7)
  return _save(fig, workdir, 'ladder')


def calibration_figure(workdir: str, checks: list[dict[str, Any]]) -> str | None:
  """QQ plot of each null's class-test p-values against the uniform distribution."""
  nulls = [c for c in checks if c['name'].startswith('null/') and c.get('p_values')]
  if not nulls:
    return None
  kinds = sorted({c['name'].split('/')[1] for c in nulls})
  fig, axes = figures.new_fig(3.4 * len(kinds), 3.2, 1, len(kinds))
  for i, kind in enumerate(kinds):
    ax = axes[0, i]
    for j, c in enumerate(c for c in nulls if c['name'].split('/')[1] == kind):
      p = np.sort(np.asarray(c['p_values']))
      q = (np.arange(1, p.size + 1) - 0.5) / p.size
      ax.plot(q, p, 'o-', ms=3, lw=0.8, color=figures.TOWER_COLORS[j % len(figures.TOWER_COLORS)],
              label=f"{c['name'].split('/')[2]} (FPR {_num(c['fpr'], '.2f')})")
    ax.plot([0, 1], [0, 1], color='grey', lw=0.8, ls=':')
    ax.set_title(f'null: {kind}', fontsize=9)
    ax.set_xlabel('uniform quantile')
    ax.set_ylabel('class test p (sorted)')
    ax.legend(fontsize=7)
  return _save(fig, workdir, 'calibration')


def _save(fig, workdir: str, name: str) -> str:
  d = os.path.join(workdir, FIG_DIR)
  os.makedirs(d, exist_ok=True)
  path = os.path.join(d, f'{name}.png')
  fig.tight_layout()  # the panels' axis labels otherwise overlap their neighbours
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return os.path.join(FIG_DIR, f'{name}.png')


def verdict(check: dict[str, Any]) -> str:
  """'pass', 'FAIL' (a required check) or 'fail (secondary)'."""
  if check['passed']:
    return 'pass'
  return 'FAIL' if check.get('required', True) else 'fail (secondary)'


def markdown(result: dict[str, Any]) -> str:
  """validation.md: the verdict, the ladder tables, the nulls' rates, the runs."""
  primary = result.get('primary', '')
  est = primary.split('/')[0]
  lines = ['# Known-answer validation', '',
           f'**{"PASSED" if result["passed"] else "FAILED: " + ", ".join(result["failed"])}**',
           '', 'The planted class test of each estimator (stratified AUC of syntax vs topic '
           'items within strata of frequency and item loss; a split needs that association and '
           'both classes leaning to their own tower; docs/ANALYSIS_STATS.md). Alpha '
           f'{result["alpha"]}, largest false-positive rate allowed {result["max_fpr"]}.', '']
  if est:
    secondary = result.get('secondary_failed') or []
    lines += [f'Required: the checks of `{est}`, the estimator of the primary test '
              f'`{primary}` (what a headline claim rests on). The other estimators\' checks '
              'are secondary: reported, and a failure says that estimator\'s class test is '
              'not calibrated there, but it does not fail the validation. Secondary checks '
              'failed: ' + (', '.join(secondary) if secondary else 'none') + '.', '']
  lines += ['## The ladder', '',
            'Sources trained with class weights: tower 0 w on syntax targets and 1 - w on topic '
            'targets, tower 1 the reverse. `gate`: towers frozen, the latent gate trained; '
            '`joint`: the default concat gate, everything trained. L, the split strength: the '
            'smaller of the share of syntax items leaning to tower 0 and the share of topic '
            'items leaning to tower 1 (95% interval). It must rise with w (within its '
            'intervals); `gate`: the top rung above w = 0.5, and w = 0.5 no split; `joint`: a '
            'split at every w > 0.5 (joint training may divide the labour itself, so its '
            'w = 0.5 is reported, not checked). Beside it the adjusted AUC of the association '
            'and the class test p.', '']
  if result.get('figures', {}).get('ladder'):
    lines += [f'![ladder]({result["figures"]["ladder"]})', '']
  lines += ['| ladder | estimator | w: L [95% CI], adjusted AUC, p | check |',
            '|---|---|---|---|']
  for c in result['checks']:
    if not c['name'].startswith('ladder/'):
      continue
    _, ladder, mode, est = c['name'].split('/')
    cells = '; '.join(f"{r['w']:g}: {_num(r['strength'], '.2f')} "
                      f"{_ci(r['strength_ci'], '.2f')}, {_num(r['auc'], '.2f')}, "
                      f"p {_num(r['p'], '.4f')}{' split' if r['split'] else ''}"
                      for r in c['rungs'])
    lines.append(f'| {ladder}/{mode} | {est} | {cells} | {verdict(c)}'
                 f'{"" if c["passed"] else ": " + c["why"]} |')
  lines += ['', '## The nulls', '',
            '`seeds`: towers from two independently seeded runs on every target; `quality`: a '
            'run and one trained for far fewer steps; `shuffled`: the class test on the '
            'shuffled-tower draws of those models. Each replicate has its own corpus. A '
            'rejection here is a false positive.', '']
  if result.get('figures', {}).get('calibration'):
    lines += [f'![calibration]({result["figures"]["calibration"]})', '']
  lines += ['| null | estimator | rejections / tests | false-positive rate [95% CI] | check |',
            '|---|---|---|---|---|']
  for c in result['checks']:
    if c['name'].startswith('null/'):
      _, null, est = c['name'].split('/')
      lines.append(f"| {null} | {est} | {c['rejections']}/{c['n']} | {_num(c['fpr'])} "
                   f"{_ci(c['fpr_ci'])} | {verdict(c)} |")
  lines += ['', '## Runs', '', '| run | steps | eval loss (trained targets) | eval loss (all) | '
            'train wall / CPU s | analysis wall / CPU s |', '|---|---|---|---|---|---|']
  for name, r in result['runs'].items():
    ev = r.get('eval') or {}
    lines.append(f'| {name} | {r.get("step")} | {_num(ev.get("loss"))} | '
                 f'{_num(ev.get("loss_all", ev.get("loss")))} | '
                 f'{_num(r.get("train_wall_s"), ".0f")} / {_num(r.get("train_cpu_s"), ".0f")} | '
                 f'{_num(r.get("analysis_wall_s"), ".0f")} / '
                 f'{_num(r.get("analysis_cpu_s"), ".0f")} |')
  return '\n'.join(lines) + '\n'


def write(workdir: str, result: dict[str, Any]) -> None:
  result['figures'] = {'ladder': ladder_figure(workdir, result['checks']),
                       'calibration': calibration_figure(workdir, result['checks'])}
  workdir_lib.write_json(os.path.join(workdir, VALIDATION_JSON), result)
  workdir_lib.write_text(os.path.join(workdir, VALIDATION_MD), markdown(result))
