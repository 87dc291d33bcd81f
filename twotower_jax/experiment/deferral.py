"""Co-LLM deferral over an experiment's points: aggregation='deferral'.

Co-LLM: a latent gate trained by marginal likelihood learns, per token, when to defer to
another model, and the combination beats either model alone. The experiment
(configs/experiments/deferral.py) trains domain experts and a model of every domain, then
composes the experts (model.init_towers='{point:A},{point:B}', towers frozen) and trains the
gate; each point is analysed once per domain (exp.analyses: analysis.eval_documents). This
reads those analyses' summary.json: per point and domain the held-out loss, and for a
composition (the gate estimator) the share of tokens whose largest prior picks each tower
(Co-LLM's argmax deferral), that rule's loss and the mean posterior per tower. Tower k of a
composition is named by the variant of its k-th '{point:...}'. Per variant and domain:
means over the seeds with Student t 95% intervals, and differences paired by seed.
"""

from __future__ import annotations

import os
from typing import Any

from twotower_jax import workdir as workdir_lib
from twotower_jax.experiment import runner
from twotower_jax.experiment import spec as spec_lib
from twotower_jax.experiment.loss import header, pair_key, t_interval
from twotower_jax.report import render
from twotower_jax.report.format import H, P, TABLE, UL, _finite, ci, num


def _domain(wd: str, name: str) -> dict[str, Any]:
  summary = workdir_lib.read_json(os.path.join(wd, f'analysis_{name}', workdir_lib.SUMMARY_JSON))
  gate = (summary.get('per_estimator') or {}).get('gate')
  out = {'eval_loss': summary.get('eval_loss'), 'documents': len(summary.get('eval_documents')
                                                                  or []),
         'positions': summary.get('n_positions')}
  if gate and len(gate.get('position_means') or []) > 1:
    extras = gate.get('extra_means') or {}
    out['gate'] = {'chosen': [extras.get(f'chosen_t{k}') for k in range(len(gate['position_means']))],
                   'argmax_loss': extras.get('argmax_nll'),
                   'posterior': list(gate['position_means'])}
  return out


def aggregate(exp, points: list[spec_lib.Point], root: str, provenance: dict[str, Any]
              ) -> dict[str, Any]:
  """results.json's content from the finished points (the caller checked they are)."""
  domains = list(exp.analyses.keys())
  if not domains:
    raise spec_lib.ExperimentError("aggregation='deferral' reads one analysis per domain: set "
                                   "analyses, e.g. analyses.old = {'eval_documents': '^18'}")
  group_by = spec_lib.axes(exp)[0][0]
  records = []
  for p in points:
    wd = runner.point_dir(root, p)
    experts = [q.values.get(spec_lib.VARIANT, q.name) for q in spec_lib.references(p, points)]
    records.append({'name': p.name, 'group': p.group, 'values': p.values, 'experts': experts,
                    'domains': {d: _domain(wd, d) for d in domains}})
  names = list(dict.fromkeys(r['group'] for r in records))
  groups = {}
  for g in names:
    rs = [r for r in records if r['group'] == g]
    out = {'points': [r['name'] for r in rs], 'experts': rs[0]['experts'], 'domains': {}}
    for d in domains:
      cell = {'eval_loss': t_interval([r['domains'][d]['eval_loss'] for r in rs])}
      for other in names:
        if other == g:
          continue
        by = {pair_key(r, group_by): r for r in records if r['group'] == other}
        cell[f'minus_{other}'] = t_interval([
            r['domains'][d]['eval_loss'] - by[pair_key(r, group_by)]['domains'][d]['eval_loss']
            for r in rs if pair_key(r, group_by) in by])
      if all('gate' in r['domains'][d] for r in rs):
        cell['share'] = {e: t_interval([r['domains'][d]['gate']['chosen'][k] for r in rs])
                         for k, e in enumerate(out['experts'])}
        cell['argmax_loss'] = t_interval([r['domains'][d]['gate']['argmax_loss'] for r in rs])
        cell['posterior'] = {e: t_interval([r['domains'][d]['gate']['posterior'][k]
                                            for r in rs]) for k, e in enumerate(out['experts'])}
      out['domains'][d] = cell
    if out['experts'] and all('gate' in r['domains'][d] for r in rs for d in domains):
      # Does deferral follow the domain? Tower k's share on its own domain (the analysis named
      # like its variant) minus on every other domain, per seed.
      out['follows_domain'] = {
          e: {d: t_interval([r['domains'][e]['gate']['chosen'][k] -
                             r['domains'][d]['gate']['chosen'][k] for r in rs])
              for d in domains if d != e}
          for k, e in enumerate(out['experts']) if e in domains}
    groups[g] = out
  return workdir_lib.clean({
      'experiment': exp.name, 'aggregation': 'deferral', **provenance,
      'settings': {'group_by': group_by, 'domains': {d: str(exp.analyses[d].get(
          'eval_documents', '')) for d in domains},
          'interval': 'Student t 95% over the points of a group'},
      'groups': groups, 'points': records})


def _cell(t: dict[str, Any] | None, digits: int = 3) -> str:
  return 'n/a' if not t else f"{num(t['mean'], digits)} {ci(t['ci'], digits)}"


def _verdict(t: dict[str, Any], above: str, below: str) -> str:
  lo, hi = t['ci']
  if not (_finite(lo) and _finite(hi)):
    return f"{num(t['mean'])} (no interval: fewer than 2 points)"
  side = above if lo > 0 else below if hi < 0 else 'not told apart (the interval holds 0)'
  return f'{side}: {_cell(t)} over {t["n"]} seeds'


def writeup(root: str, res: dict[str, Any]) -> dict[str, Any]:
  """results.md."""
  s = res['settings']
  domains, groups = list(s['domains']), res['groups']
  loss_rows = [[g, d, _cell(gr['domains'][d]['eval_loss'], 4)] +
               [_cell(gr['domains'][d].get(f'minus_{o}'), 4) for o in groups if o != g]
               for g, gr in groups.items() for d in domains]
  blocks = [
      *header(res),
      H(2, 'Held-out loss per domain'),
      P('Domains (analysis.eval_documents over every era\'s held-out speeches): ' +
        ', '.join(f'{d} = `{r}`' for d, r in s['domains'].items()) + '. Mean over the seeds '
        'with a Student t 95% interval (1 degree of freedom with 2 seeds: wide); "- X": the '
        "difference from X's point of the same seed.")]
  for g in groups:  # one table per variant: its difference columns are its own
    others = [o for o in groups if o != g]
    blocks.append(TABLE([s['group_by'], 'domain', 'held-out loss'] + [f'- {o}' for o in others],
                        [r for r in loss_rows if r[0] == g]))
  sentences = []
  for g, gr in groups.items():
    if 'follows_domain' not in gr:
      continue
    share_rows = [[d, *[_cell(gr['domains'][d]['share'][e]) for e in gr['experts']],
                   _cell(gr['domains'][d]['argmax_loss'], 4)] for d in domains]
    blocks += [H(2, f'{g}: deferral'),
               P('Share of tokens whose largest gate prior picks each expert (Co-LLM\'s argmax '
                 'deferral, `generate --co_llm=argmax`) and that rule\'s held-out loss.'),
               TABLE(['domain'] + [f'to {e}' for e in gr['experts']] + ['argmax loss'],
                     share_rows)]
    for e, by in gr['follows_domain'].items():
      for d, t in by.items():
        sentences.append(f"{g}: the share of tokens sent to {e} is " + _verdict(
            t, f'higher on {e} documents than on {d} documents',
            f'lower on {e} documents than on {d} documents') + '.')
    for d in domains:
      for o in groups:
        if o != g and f'minus_{o}' in gr['domains'][d]:
          sentences.append(f'{g} vs {o} on {d}: held-out loss ' + _verdict(
              gr['domains'][d][f'minus_{o}'], f'higher than {o}', f'lower than {o}') + '.')
  if sentences:
    blocks += [H(2, 'What the intervals show'), UL(sentences)]
  path = os.path.join(root, 'results.md')
  workdir_lib.write_text(path, render.to_markdown(blocks))
  return {'results_md': path, 'figures': {}}
