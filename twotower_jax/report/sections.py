"""The report's sections: headline, run overview, per-estimator statistics, agreement,
structural probe and token view, as blocks (format.py) built from DIR/analysis alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from twotower_jax.report import headline
from twotower_jax.report import lens as lens_report
from twotower_jax.report.format import (FIG, H, P, SPACE_PIECE, TABLE, TOP_K, UL, WHY, _finite,
                                        _tower_keys, ci, count, leaning_items, md_escape, num,
                                        show_piece)


def _how_to_read(n_towers: int, meanings: dict[str, str]) -> list:
  multi = n_towers > 2
  sign = ('With two towers, **preference = value under tower 0 minus value under tower 1**: '
          'positive means the item leans to tower 0, negative to tower 1, 0 means no lean.')
  if multi:
    sign = (f'With {n_towers} towers, **preference = value under the item\'s best tower minus '
            'the mean of the others**: it is always about the best tower (listed per item), and '
            'larger means a sharper preference.')
  single = []
  if n_towers == 1:
    single = [P('**This is a one-tower model.** Its hidden units were split into two random '
                'halves, called "tower 0" and "tower 1" below. Whatever split appears here is '
                'the baseline that a real two-tower split has to beat.')]
  return [
      H(2, 'How to read this report')] + single + [
      P('The model has several towers (independent networks whose states are combined to '
        'predict the next token). For every vocabulary item (a SentencePiece piece; a leading '
        f'"{SPACE_PIECE}" marks the start of a word) the analysis measures which tower the '
        'prediction of that item relies on. That number is the item\'s **preference**.'),
      P(sign),
      UL([f'`{est}`: per-tower value = {meaning}.' for est, meaning in meanings.items()]),
      P('The estimators measure different things, so they can disagree without either being '
        'wrong: `probe` measures what can be decoded about the next item from one tower\'s '
        'states alone (a fresh head trained on them); `ablation` and `resample` measure how '
        'much the trained model\'s own prediction of the item uses each tower (the loss when '
        'that tower\'s states are replaced); `gate` measures which tower a mixture gate '
        'credits with the item. A tower can carry information the model does not use, and '
        'the reverse.'),
      P('**Two kinds of test.** (1) "Some items prefer a tower": the preferences are compared '
        'with the same estimator when the towers\' values are shuffled at every occurrence, '
        'which removes any preference. It rejects whenever items prefer a tower at all, '
        'including when one tower is simply better for every item; it says nothing about '
        'word classes. (2) "Class split": function words (closed class: DET, ADP, AUX, PRON, '
        'CCONJ, SCONJ, PART) and content words (NOUN, PROPN, VERB, ADJ, ADV) lean to '
        'different towers. It is claimed only when three things hold: within strata of '
        'frequency and of the model\'s loss on the item, the classes\' preferences differ '
        '(the adjusted AUC, tested by permuting the class labels within strata, so '
        'frequency and difficulty alone cannot produce it), and each class on its own leans '
        'to its tower (a signed-rank test of its preferences against 0, so a tower that is '
        'better for everything is not a split). Punctuation is tested the same way, apart '
        'from function words; word-internal pieces (e.g. "ing") have no class and are left '
        'out. A class split says the two towers of this model differ by class; it does not '
        'say that training them together made them differ: two towers trained apart from '
        'different seeds can differ by class too, and how often each estimator\'s class test '
        'then calls a split is measured by `python -m twotower_jax.validate` (its seeds '
        'null; docs/ANALYSIS.md, "Known-answer validation").'),
      P('**AUC.** The adjusted AUC is the probability that, of a function word and a '
        'content word in the same stratum, the function word has the higher preference '
        '(leans more to tower 0). 0.5 = no difference. The bracket is a 95% interval from '
        'resampling held-out documents, then items. The plain AUC (no strata) and the AUC of '
        'the normalised preference, (v0 - v1) / (|v0| + |v1|), are shown beside it.'),
      P('**Multiplicity.** One test, `analysis.primary`, is fixed before the data is seen and '
        'judged on its own p; every other test is judged on its Holm-adjusted p, listed in '
        '"The tests".'),
      P('**Bimodality.** A normal curve gives about 0.33 and 0.555 or more suggests two '
        'modes; it is compared with the shuffled-tower control, so it too only says that '
        'items prefer towers, not why.'),
      P('**Token view.** At the end, held-out text with each piece marked by the tower it leans '
        'to; report.html shows it in colour (blue = tower 0, orange = tower 1). '
        'docs/REPORT.md explains every figure.'),
      P('Counts are occurrences of the item among the scored evaluation positions; statistics '
        'use items seen at least `min_count` times. An item\'s interval treats the held-out '
        'documents as clusters (occurrences in one document are not independent). "n/a" marks '
        'a number that could not be computed (too few items, one class empty, constant '
        'values).'),
  ]


LOW_AGREEMENT = 0.3  # an estimator whose best Spearman with the others is below this is flagged


def warnings_for(est: str, ps: dict[str, Any], agreement: dict[str, Any]) -> list[str]:
  """Reasons to distrust one estimator: a probe that did not converge, weak agreement."""
  out = []
  training = ps.get('training') or {}
  if training and not training.get('converged', True):
    out.append(f'`{est}` did not converge: its heads stopped at the step cap '
               f"({count(training.get('steps'))} steps) before the held-out loss levelled off; "
               'raise analysis.probe_steps')
  rhos = [v.get('spearman') for k, v in (agreement or {}).items()
          if est in k.split('~') and _finite(v.get('spearman'))]
  if rhos and max(rhos) < LOW_AGREEMENT:
    out.append(f'`{est}` agrees weakly with the other estimators (best Spearman '
               f'{num(max(rhos), 2)} < {LOW_AGREEMENT}): it ranks the items differently, so '
               'a claim from it alone is a claim about what it measures')
  return out


def _overview(summary: dict[str, Any]) -> list:
  rows = [
      ('workdir', str(summary.get('workdir', 'n/a'))),
      ('checkpoint step', count(summary.get('step'))),
      ('towers', count(summary.get('n_towers'))),
      ('tower type', str(summary.get('tower_type', 'n/a'))),
      ('gate', str(summary.get('gate', 'n/a'))),
      ('scored positions', count(summary.get('n_positions'))),
      ('eval windows', count(summary.get('n_eval_windows'))),
      ('min_count (items used in statistics)', count(summary.get('min_count'))),
      ('eval loss (cross-entropy, nats)', num(summary.get('eval_loss'))),
      ('estimators', ', '.join(summary.get('estimators') or []) or 'none'),
  ]
  return [H(2, 'Run'), TABLE(['what', 'value'], [(a, md_escape(b)) for a, b in rows])]


def _distribution(est, ps, figs) -> list:
  out = [H(3, 'Distribution of preference')]
  control = ps.get('control') or {}
  out.append(TABLE(['', 'bimodality coefficient'], [
      ['this model', num(ps.get('bimodality'))],
      [f"control ({md_escape(control.get('kind', 'n/a'))})", num(control.get('bimodality'))],
  ]))
  if 'hist' in figs:
    out.append(FIG(figs['hist'], f'Histogram of `{est}` preference over items with count >= '
                   'min_count (bars) and one shuffled-tower control draw (line). Any item-to-item '
                   'difference in preference makes the bars wider than the line; only the class '
                   'tests say whether it follows word classes.'))
  elif not (ps.get('histogram') or {}).get('counts'):
    out.append(WHY('no histogram in summary.json for this estimator'))
  return out


def _frequency(est, ps, figs) -> list:
  out = [H(3, 'Preference vs frequency')]
  fr = ps.get('frequency')
  if not fr:
    return out + [WHY('no frequency statistics in summary.json for this estimator')]
  out.append(P(f"Spearman correlation of preference with log-frequency: "
               f"{num(fr.get('spearman_logfreq'))} {ci(fr.get('ci'))}. Near 0 means the split "
               'is not just frequent vs rare items; the bins below repeat the statistics within '
               'items of similar frequency.'))
  if 'freq' in figs:
    out.append(FIG(figs['freq'], f'`{est}` preference of each item against its count (log '
                   'scale); black: mean preference per frequency bin.'))
  bins = fr.get('bins') or []
  if bins:
    out.append(TABLE(['count from', 'count to', 'items', 'mean preference',
                      'AUC closed vs open'],
                     [[count(b.get('lo')), count(b.get('hi')), count(b.get('n')),
                       num(b.get('mean_pref')), num(b.get('auc_closed'))] for b in bins]))
  else:
    out.append(WHY('no frequency bins: no item reached min_count' if not ps.get('n_items')
                   else 'no frequency bins in summary.json'))
  return out


def _class_rows(block: dict[str, Any] | None, rows: dict[str, Any], name: str, label: str):
  """One table row per class test: its statistics and verdict."""
  if not block or 'test' not in block:
    return []
  t = block['test']
  assoc = t.get('association') or {}
  lp, ln = t.get('lean_positive') or {}, t.get('lean_negative') or {}
  row = rows.get(name) or {}
  return [[md_escape(label), num(assoc.get('auc')), ci(assoc.get('ci')),
           num(block.get('auc_unadjusted')), num(block.get('auc_normalized')),
           f"{count(block.get('n_positive'))} / {count(block.get('n_negative'))}",
           f"{num(lp.get('median'))} / {num(ln.get('median'))}",
           num(block.get('p'), 4), num(row.get('p_adjusted'), 4) if not row.get('primary')
           else 'primary', 'yes' if row.get('significant') else 'no']]


def _enrichment(est, ps, figs, summary=None) -> list:
  out = [H(3, 'Word classes')]
  ce = ps.get('class_enrichment')
  if not ce:
    return out + [WHY('no class test in summary.json (no word classes known)')]
  rows = headline.tests_by_name(summary or {})
  src = headline.SOURCES.get(ce.get('source'), str(ce.get('source')))
  table = (_class_rows(ce, rows, f'{est}/class', 'function vs content words') +
           _class_rows(ps.get('punct'), rows, f'{est}/punct', 'punctuation vs content words'))
  for source, block in (ps.get('class_sensitivity') or {}).items():
    table += _class_rows(block, rows, f'{est}/class@{source}',
                         f'function vs content words ({headline.SOURCES.get(source, source)})')
  out.append(P(f'Word classes from {md_escape(src)}; {count(ps.get("n_fragments"))} scored items '
               'are word-internal pieces and belong to no class. Stratified AUC: within strata '
               'of frequency and item loss (95% interval over documents and items); p: the '
               'class test (association within strata and both classes leaning to their own '
               'tower).'))
  if not table:
    return out + [WHY('summary.json was written before the class test existed; rerun the '
                      'analysis')]
  out.append(TABLE(['classes', 'adjusted AUC', '95% CI', 'plain AUC', 'normalised AUC',
                    'items', 'median pref', 'p', 'Holm p', 'split'], table))
  if 'class' in figs:
    out.append(FIG(figs['class'], f'`{est}` preference of function words vs content words.'))
  return out


def _training(est, ps, figs) -> list:
  """The probe heads' training: the held-out curve and where it stopped."""
  tr = ps.get('training')
  if not tr:
    return []
  heads = tr.get('heldout_loss') or []
  out = [H(3, 'Probe training'),
         P(f"Trained on {count(tr.get('n_train_positions'))} positions of training windows, "
           f"stopped on {count(tr.get('n_heldout_positions'))} held-out ones: "
           f"{'converged' if tr.get('converged') else '**did not converge** (step cap reached)'}"
           f" after {count(tr.get('steps'))} steps. Held-out loss per head: "
           f"{', '.join(f'tower {k} {num(v)}' for k, v in enumerate(heads)) or 'n/a'}; the "
           f"model itself {num(tr.get('model_heldout_loss'))} on the same positions (a head "
           'reads one tower only, so it is expected to be worse).' + (
               f" Of the scored items, {count(tr.get('scored_items_seen'))} occur at least "
               f"{count(tr.get('seen_threshold'))} times as targets in the heads' training "
               'positions; the probe values of the others rest on little training.'
               if _finite(tr.get('scored_items_seen')) else ''))]
  if 'training' in figs:
    out.append(FIG(figs['training'], f'`{est}` heads: held-out loss during training.'))
  return out


def _top_items(est, ps, prefs, n_towers, figs) -> list:
  out = [H(3, f'Top {TOP_K} items per tower')]
  top = ps.get('top_items') or {}
  if not top:
    return out + [WHY('no top items in summary.json for this estimator')]
  if 'top' in figs:
    out.append(FIG(figs['top'], f'Items with the strongest `{est}` preference for each tower.'))
  lo_col, hi_col = prefs.get(f'{est}_pref_lo'), prefs.get(f'{est}_pref_hi')
  row_of = {int(t): i for i, t in enumerate(prefs['token_id']) if _finite(t)}
  for key in _tower_keys(top):
    items = leaning_items(top, key, n_towers)
    label = key.replace('_', ' ')
    if n_towers <= 2:
      label += (' (largest positive preference)' if label.endswith('0') else
                ' (most negative preference)')
    out.append(P(f'**{label}**'))
    if not items:
      out.append(WHY(f'no item with count >= min_count leans to {key.replace("_", " ")}'))
      continue
    if len(items) < TOP_K:
      out.append(P(f'Only {len(items)} items with count >= min_count lean to this tower.'))
    rows = []
    for rank, it in enumerate(items, 1):
      i = row_of.get(int(it['token_id'])) if _finite(it.get('token_id')) else None
      interval = ([lo_col[i], hi_col[i]] if i is not None and isinstance(lo_col, np.ndarray)
                  and isinstance(hi_col, np.ndarray) else None)
      cls = prefs['word_class'][i] if i is not None and 'word_class' in prefs else ''
      rows.append([str(rank), md_escape(show_piece(it.get('piece', ''))),
                   count(it.get('token_id')), count(it.get('count')), num(it.get('pref')),
                   ci(interval), md_escape(cls or '-')])
    out.append(TABLE(['#', 'piece', 'token id', 'count', 'preference', '95% CI', 'class'], rows))
  return out


def _planted(est, ps, figs, summary=None) -> list:
  pl = ps.get('planted')
  if not pl:
    return []
  out = [H(3, 'Planted classes'),
         P('The corpus was built with planted "syntax" and "topic" items; the class test asks '
           'whether they lean to different towers, as for word classes.')]
  table = _class_rows(pl, headline.tests_by_name(summary or {}), f'{est}/planted',
                      'syntax vs topic items')
  if table:
    out.append(TABLE(['classes', 'adjusted AUC', '95% CI', 'plain AUC', 'normalised AUC',
                      'items', 'median pref', 'p', 'Holm p', 'split'], table))
  if 'planted' in figs:
    out.append(FIG(figs['planted'], f'`{est}` preference by planted class.'))
  return out


def _estimator_section(est, ps, prefs, n_towers, figs, summary=None) -> list:
  out = [H(2, f'Estimator `{est}`'),
         P(f"Per-tower value: {ps.get('description') or 'see docs/ANALYSIS.md'}. "
           f"Items with count >= min_count: {count(ps.get('n_items'))}. "
           f"Time {num(ps.get('seconds'), 1)} s, {num(ps.get('tokens_per_s'), 0)} tokens/s.")]
  if ps.get('note'):  # e.g. too few items for the statistics: say so once, then n/a below
    out.append(P(ps['note'][0].upper() + ps['note'][1:] + '.'))
  out += _training(est, ps, figs)
  out += _distribution(est, ps, figs)
  out += _frequency(est, ps, figs)
  out += _enrichment(est, ps, figs, summary)
  out += _top_items(est, ps, prefs, n_towers, figs)
  out += _planted(est, ps, figs, summary)
  return out


def _agreement(summary, figs) -> list:
  out = [H(2, 'Agreement between estimators')]
  ests = summary.get('estimators') or []
  agr = summary.get('agreement') or {}
  if len(ests) < 2 or not agr:
    return out + [WHY(f'only {len(ests)} estimator(s) ran ({", ".join(ests) or "none"}); '
                      'agreement needs two or more')]
  out.append(P('Spearman rank correlation of the item preferences between two estimators '
               '(1 = same ranking, 0 = unrelated). High agreement means the split does not '
               'depend on how preference is measured.'))
  out.append(TABLE(['pair', 'Spearman', '95% CI', 'items'],
                   [[md_escape(k), num(v.get('spearman')), ci(v.get('ci')), count(v.get('n'))]
                    for k, v in agr.items()]))
  if 'agreement' in figs:
    out.append(FIG(figs['agreement'], 'Item preferences of each pair of estimators.'))
  return out


def _structural(sp, figs) -> list:
  out = [H(2, 'Structural probe (syntax trees in each tower)')]
  if not sp:
    return out + [WHY('no structural probe: analysis.struct_conllu was not set, so no '
                      'treebank was given')]
  out.append(P('A linear map of each tower\'s states per layer is trained so that squared '
               'distances between word vectors match distances in the dependency tree (Hewitt '
               'and Manning). UUAS = share of gold tree edges recovered by the minimum spanning '
               'tree of the predicted distances; DSpr = Spearman of predicted vs tree distances '
               '(sentences of 5-50 words). The tower whose states encode trees better scores '
               'higher. Baseline: linking each word to its neighbour gives UUAS '
               f"{num(sp.get('baseline_uuas_adjacent'))}. Held-out sentences: "
               f"{count(sp.get('n_test_sentences'))}."))
  if 'struct' in figs:
    out.append(FIG(figs['struct'], 'UUAS and DSpr per layer, one line per tower.'))
  layers = sp.get('layers') or []
  uuas, dspr = sp.get('uuas') or [], sp.get('dspr') or []
  rows = []
  for k in range(len(uuas)):
    for j, name in enumerate(layers):
      u = uuas[k][j] if j < len(uuas[k]) else None
      d = dspr[k][j] if k < len(dspr) and j < len(dspr[k]) else None
      rows.append([str(k), md_escape(str(name)), num(u), num(d)])
  best = []
  for k, row in enumerate(uuas):
    vals = [(float(v), j) for j, v in enumerate(row) if _finite(v)]
    if vals:
      v, j = max(vals)
      name = layers[j] if j < len(layers) else str(j)
      best.append(f'tower {k} {num(v)} ({md_escape(str(name))})')
  out.append(P('Best UUAS per tower: ' + ('; '.join(best) if best else 'n/a') + '.'))
  out.append(TABLE(['tower', 'layer', 'UUAS', 'DSpr'], rows))
  return out


def _token_view(tv, n_towers) -> list:
  out = [H(2, 'Token view')]
  if not tv or not tv.get('passages'):
    return out + [WHY('token_view.json is missing or has no passages')]
  note = str(tv.get('note', '')).strip()
  out.append(P('Held-out passages with each piece marked by the tower it leans to (estimator '
               f"{md_escape(str(tv.get('estimator', 'n/a')))}). In report.html the pieces are "
               'coloured: blue = tower 0, orange = tower 1, stronger colour = stronger lean, '
               'grey = not scored.' + (f' Lean: {md_escape(note)}.' if note else '')))
  out.append(('tokens', tv['passages']))
  return out



def build_blocks(summary, prefs, token_view, struct, figs, lens=None) -> list:
  """The report's content, independent of the output format (`lens`: tuned_lens.json)."""
  n_towers = int(summary.get('n_towers') or 2)
  per_est = summary.get('per_estimator') or {}
  ests = [e for e in (summary.get('estimators') or list(per_est)) if e in per_est]
  blocks = [H(1, 'Tower preference report')]
  blocks.append(H(2, 'Headline'))
  if ests:
    blocks += headline.blocks(summary, ests, n_towers)
    flags = [w for e in ests for w in warnings_for(e, per_est[e], summary.get('agreement'))]
    if flags:
      blocks.append(P('**Caution.** ' + ' '.join(f'{w}.' for w in flags)))
  else:
    blocks.append(WHY('no estimator ran, so there is no preference to report'))
  for e, why in (summary.get('estimators_skipped') or {}).items():
    blocks.append(WHY(f'estimator {md_escape(e)} did not run: {md_escape(str(why))}'))
  blocks += _how_to_read(n_towers, {e: per_est[e].get('description') or 'see docs/ANALYSIS.md'
                                    for e in ests})
  blocks += _overview(summary)
  blocks += headline.tests_table(summary)
  for e in ests:
    blocks += _estimator_section(e, per_est[e], prefs, n_towers, figs.get(e, {}), summary)
  blocks += _agreement(summary, figs.get('_all', {}))
  blocks += _structural(struct, figs.get('_all', {}))
  blocks += lens_report.blocks(lens, summary, prefs, figs.get('_lens', {}))
  blocks += _token_view(token_view, n_towers)
  return blocks
