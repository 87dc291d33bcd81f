"""Weight tying's bias over an experiment's points: aggregation='tying'.

Lopardo et al. found that a tied token table aligns more with an untied model's output
matrix than with its input table, that the output gradient dominates the table early in
training, and that scaling the table's input gradient reduces the bias. This reads each
point's token matrices (analysis/token_tables.py, one shared tokenizer: the experiment's
shared_tokenizer), the table's logged gradient norms and, when the points were analysed
with analysis.lens, their tuned_lens.json. Per tied group (a value of group_by):
- `bias[measure]`: per tied point, similarity(table, untied output) - similarity(table,
  untied input), averaged over the untied points; then over the group's points, with a
  Student t 95% interval (> 0: the table sits nearer the output side).
- `bias_vs_reference`: its difference from the first tied group's point of the same seed.
- `grad_ratio`: output / input gradient norm of the table, first and last 10% of the logs.
- `lens`: per layer, the tuned lens's KL to the final distribution and the layer's share of
  the residual stream, over the points (tower 0), with a Student t 95% interval.
Each variant's seed pair gives the reference level of each measure (the same matrix of two
seeds). DIR/alignment/ holds the align command's own report of every pair.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import alignment as alignment_lib
from twotower_jax.analysis import token_tables
from twotower_jax.experiment import runner
from twotower_jax.experiment import spec as spec_lib
from twotower_jax.experiment.loss import header, pair_key, t_interval
from twotower_jax.report import alignment as align_report
from twotower_jax.report import render
from twotower_jax.report.format import FIG, H, P, TABLE, UL, _finite, ci, num

ALIGNMENT_DIR = 'alignment'
MIN_COUNT, K = 20, 10  # the align command's defaults


def _value(pairs: list[dict], a: tuple[int, str], b: tuple[int, str], measure: str) -> float:
  for p in pairs:
    if {(p['run_a'], p['matrix_a']), (p['run_b'], p['matrix_b'])} == {a, b}:
      return float(p[measure]['value'])
  return float('nan')


def _lens(wd: str) -> dict[str, Any] | None:
  lens = workdir_lib.read_optional_json(os.path.join(workdir_lib.analysis_dir(wd),
                                                     workdir_lib.TUNED_LENS_JSON))
  if not lens:
    return None
  return {'layers': lens['layers'], 'kl': lens['kl'][0], 'contribution': lens['contribution'][0]}


def _by_layer(lenses: list[dict], key: str) -> list[dict[str, Any]]:
  """Per layer, the points' values: mean and t interval (of the finite ones)."""
  cols = np.asarray([x[key] for x in lenses], float).T
  return [t_interval([float(v) for v in c[np.isfinite(c)]]) for c in cols]


def aggregate(exp, points: list[spec_lib.Point], root: str, provenance: dict[str, Any]
              ) -> dict[str, Any]:
  """results.json's content from the finished points (the caller checked they are)."""
  runs = [token_tables.read_run(runner.point_dir(root, p)) for p in points]
  result = token_tables.compare_runs(runs, MIN_COUNT, K, int(exp.n_boot), int(exp.seed))
  for r, p in zip(result['runs'], points):
    r['workdir'] = p.name  # DIR-relative: results.json does not depend on where DIR is
  align_report.write(os.path.join(root, ALIGNMENT_DIR), result)
  pairs, measures = result['pairs'], result['measures']
  tied = [i for i, p in enumerate(points) if p.config.model.embedding.tied]
  untied = [i for i, p in enumerate(points) if not p.config.model.embedding.tied]
  if not tied or not untied:
    raise spec_lib.ExperimentError("aggregation='tying' needs tied and untied points "
                                   '(model.embedding.tied true and false); add the missing kind')
  group_by = spec_lib.axes(exp)[0][0]
  records = []
  for i, p in enumerate(points):
    early, late = align_report.ratio_summary(result['runs'][i]['grad_norms'])
    rec = {'name': p.name, 'group': p.group, 'values': p.values,
           'tied': bool(p.config.model.embedding.tied),
           'input_grad_scale': float(p.config.model.embedding.input_grad_scale),
           'grad_ratio': {'early': early, 'late': late},
           'lens': _lens(runner.point_dir(root, p))}
    if rec['tied']:
      rec['bias'] = {m: float(np.nanmean([
          _value(pairs, (i, 'table'), (j, 'output'), m) -
          _value(pairs, (i, 'table'), (j, 'input'), m) for j in untied])) for m in measures}
      rec['to_output'] = {m: float(np.nanmean([_value(pairs, (i, 'table'), (j, 'output'), m)
                                               for j in untied])) for m in measures}
      rec['to_input'] = {m: float(np.nanmean([_value(pairs, (i, 'table'), (j, 'input'), m)
                                              for j in untied])) for m in measures}
    records.append(rec)
  reference = [p for p in pairs if p['seed_reference']]
  names = list(dict.fromkeys(r['group'] for r in records))
  first_tied = next(g for g in names if any(r['tied'] for r in records if r['group'] == g))
  groups = {}
  for g in names:
    rs = [r for r in records if r['group'] == g]
    out = {'points': [r['name'] for r in rs], 'tied': rs[0]['tied'],
           'grad_ratio': {k: t_interval([r['grad_ratio'][k] for r in rs])
                          for k in ('early', 'late')}}
    lenses = [r['lens'] for r in rs if r['lens']]
    if lenses:
      out['lens'] = {'layers': lenses[0]['layers'], 'kl': _by_layer(lenses, 'kl'),
                     'contribution': _by_layer(lenses, 'contribution'), 'n': len(lenses)}
    if rs[0]['tied']:
      out['bias'] = {m: t_interval([r['bias'][m] for r in rs]) for m in measures}
      out['bias_vs_reference'] = {m: _paired_bias(rs, records, first_tied, m, group_by)
                                  for m in measures}
    groups[g] = out
  return workdir_lib.clean({
      'experiment': exp.name, 'aggregation': 'tying', **provenance,
      'settings': {'group_by': group_by, 'reference': first_tied, 'min_count': MIN_COUNT,
                   'k': K, 'n_boot': int(exp.n_boot), 'n_tokens': result['n_tokens'],
                   'measures': measures, 'rotation_invariant': list(alignment_lib.ROTATION_INVARIANT),
                   'interval': 'Student t 95% over the points of a group'},
      'seed_reference': [{'pair': align_report.pair_label(result, p),
                          **{m: p[m]['value'] for m in measures}} for p in reference],
      'groups': groups, 'points': records})


def _paired_bias(rs: list[dict], records: list[dict], ref: str, m: str, group_by: str
                 ) -> dict[str, Any]:
  by = {pair_key(r, group_by): r for r in records if r['group'] == ref}
  return t_interval([r['bias'][m] - by[pair_key(r, group_by)]['bias'][m] for r in rs
                     if pair_key(r, group_by) in by])


def _cell(t: dict[str, Any]) -> str:
  if not _finite(t['mean']):
    return 'n/a'
  return f"{num(t['mean'])} {ci(t['ci'])}"


def _side(t: dict[str, Any], above: str, below: str) -> str:
  lo, hi = t['ci']
  if not (_finite(lo) and _finite(hi)):
    return 'no interval (fewer than 2 points)'
  if lo > 0:
    return f'{above} (interval above 0)'
  if hi < 0:
    return f'{below} (interval below 0)'
  return 'not told apart from 0 (the interval holds 0)'


def writeup(root: str, res: dict[str, Any]) -> dict[str, Any]:
  """results.md (the align command's report is DIR/alignment/alignment.md)."""
  s = res['settings']
  measures, ref = s['measures'], s['reference']
  tied = {g: gr for g, gr in res['groups'].items() if gr['tied']}
  sentences = []
  for g, gr in tied.items():
    for m in s['rotation_invariant']:
      sentences.append(f"{g}, {m}: the table is " + _side(
          gr['bias'][m], 'nearer the untied output matrix than the untied input table',
          'nearer the untied input table than the untied output matrix') + '.')
      if g != ref:
        sentences.append(f"{g} vs {ref}, {m}: the bias is " + _side(
            gr['bias_vs_reference'][m], f'larger than {ref}\'s', f'smaller than {ref}\'s') + '.')
  blocks = [
      *header(res),
      H(2, 'Bias of the tied table'),
      P(f"{s['n_tokens']} tokens seen at least {s['min_count']} times. Bias: similarity of the "
        "tied table to the untied points' output matrix minus its similarity to their input "
        "table, averaged over the untied points; mean over the group's points with a Student t "
        '95% interval (1 degree of freedom with 2 points: wide). Each measure is a similarity '
        '(1 = the same up to what it ignores); rotation-invariant: '
        f"{', '.join(s['rotation_invariant'])}. vs {ref}: the difference from {ref}'s point of "
        'the same seed. Every pair with its bootstrap interval: alignment/alignment.md.'),
      TABLE([s['group_by'], 'points'] + [f'bias: {m}' for m in measures] +
            [f'- {ref}: {m}' for m in s['rotation_invariant']],
            [[g, str(len(gr['points']))] + [_cell(gr['bias'][m]) for m in measures] +
             [_cell(gr['bias_vs_reference'][m]) for m in s['rotation_invariant']]
             for g, gr in tied.items()]),
      UL(sentences),
      P('Reference level (the same matrix of two seeds of one variant): ' + '; '.join(
          f"{r['pair']}: " + ', '.join(f'{m} {num(r[m])}' for m in measures)
          for r in res['seed_reference']) + '.' if res['seed_reference'] else
        'No seed pair: no reference level.'),
      H(2, 'Gradient dominance'),
      P('Output / input gradient norm of the token table (an untied point: its output '
        "matrix's over its table's), mean over the first and the last 10% of the logged steps; "
        'Student t 95% over the points.'),
      TABLE([s['group_by'], 'early', 'late'],
            [[g, _cell(gr['grad_ratio']['early']), _cell(gr['grad_ratio']['late'])]
             for g, gr in res['groups'].items()]),
      FIG(f'{ALIGNMENT_DIR}/figures/gradient_dominance.png', 'The ratio over training, per point.')]
  lens_rows = [[g, layer, _cell(gr['lens']['kl'][i]), _cell(gr['lens']['contribution'][i])]
               for g, gr in res['groups'].items() if gr.get('lens')
               for i, layer in enumerate(gr['lens']['layers'])]
  if lens_rows:
    blocks += [H(2, 'Tuned lens'),
               P('Per layer (tower 0), mean over the points with a Student t 95% interval: '
                 'the KL from the model\'s final distribution to the lens\'s, and the '
                 'layer\'s update norm relative to the residual stream (docs/COMPANIONS.md).'),
               TABLE([s['group_by'], 'layer', 'KL to final', 'contribution'], lens_rows)]
  path = os.path.join(root, 'results.md')
  workdir_lib.write_text(path, render.to_markdown(blocks))
  return {'results_md': path, 'figures': {}}
