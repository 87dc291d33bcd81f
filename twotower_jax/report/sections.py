"""The report's sections: headline, run overview, per-estimator statistics, agreement,
structural probe and token view, as blocks (format.py) built from DIR/analysis alone."""

from __future__ import annotations

from typing import Any

import numpy as np

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
      UL([f'`{est}`: per-tower value = {meaning}.' for est, meaning in meanings.items()] +
         ['Each estimator measures the same thing a different way; when they agree (see '
          '"Agreement between estimators"), the split is real rather than an artefact of one '
          'method.']),
      P('**Control.** A preference distribution only means something next to a control: the '
        'same statistic when there is no real split (the labels shuffled, or a one-tower model '
        'split into two random halves). A split shows as a wider or two-humped histogram than '
        'the control, i.e. a higher bimodality coefficient (a normal curve gives about 0.33; '
        'above 0.555 suggests two modes).'),
      P('**AUC.** The class enrichment asks whether closed-class items (function words and '
        'punctuation: DET, ADP, AUX, PRON, CCONJ, SCONJ, PART, PUNCT) have higher preference '
        'than open-class items (NOUN, PROPN, VERB, ADJ, ADV). AUC = probability that a random '
        'closed-class item has a higher preference than a random open-class item. **AUC 0.5 '
        'means no enrichment**; above 0.5 closed-class items lean to tower 0 '
        '(or, with more than two towers, have sharper preferences), below 0.5 to tower 1. '
        'The bracket is a 95% bootstrap confidence interval over items. A split is claimed '
        'only when the AUC is further from the control\'s than the control\'s own draws '
        '(the same estimator with the towers shuffled at each occurrence) would put it: p '
        'below 0.05. The control is not always at 0.5, so "the interval excludes 0.5" alone '
        'is not the test.'),
      P('**Token view.** At the end, held-out text with each piece marked by the tower it leans '
        'to; report.html shows it in colour (blue = tower 0, orange = tower 1). '
        'docs/REPORT.md explains every figure.'),
      P('Counts are occurrences of the item among the scored evaluation positions; statistics '
        'use items seen at least `min_count` times. "n/a" marks a number that could not be '
        'computed (too few items, one class empty, constant values).'),
  ]


ALPHA = 0.05  # a split is reported when its test against the control gives p below this
LOW_AGREEMENT = 0.3  # an estimator whose best Spearman with the others is below this is flagged


def _null(test: Any) -> str:
  """'control 0.50 ± 0.02, p = 0.010 (4.1 SD)' from a stats.null_test result, or ''."""
  if not isinstance(test, dict) or not _finite(test.get('null_mean')):
    return ''
  effect = f", {num(test.get('effect'), 1)} SD" if _finite(test.get('effect')) else ''
  return (f"control {num(test['null_mean'], 2)} \u00b1 {num(test.get('null_sd'), 2)}, "
          f"{p_value(test)}{effect}")


def p_value(test: Any) -> str:
  """'p = 0.031', or 'p <= 0.010' when no control draw was as extreme (the smallest p)."""
  if not isinstance(test, dict) or not _finite(test.get('p')):
    return 'p = n/a'
  p, n = float(test['p']), test.get('n_null')
  if _finite(n) and p * (float(n) + 1) <= 1.0 + 1e-9:
    return f'p \u2264 {num(p, 3)}'
  return f'p = {num(p, 3)}'


def _significant(ce: dict[str, Any]) -> bool | None:
  """Whether the class AUC differs from the control's (p < ALPHA); None when untested."""
  test = ce.get('null')
  if isinstance(test, dict) and _finite(test.get('p')):
    return float(test['p']) < ALPHA
  return None


def _direction(ce: dict[str, Any]) -> float | None:
  """AUC minus its reference (the control's mean, else 0.5)."""
  auc, test = ce.get('auc'), ce.get('null') or {}
  ref = test.get('null_mean') if _finite(test.get('null_mean')) else 0.5
  return float(auc) - float(ref) if _finite(auc) else None


def headline(est: str, ps: dict[str, Any], n_towers: int) -> str:
  """One sentence per estimator: the class split, its AUC and interval, tested against the
  estimator's own control distribution (shuffled towers), and the bimodality."""
  ce = ps.get('class_enrichment') or {}
  auc, interval = ce.get('auc'), ce.get('ci')
  control = ps.get('control') or {}
  bimod = (f'bimodality {num(ps.get("bimodality"), 2)} vs {num(control.get("bimodality"), 2)} '
           'in the control')
  if _null(control.get('null')):
    bimod += f" ({p_value(control['null'])})"
  if not _finite(auc):
    return (f'`{est}`: no class split measurable (AUC n/a: too few closed- or open-class '
            f'items); {bimod}.')
  stat = f'AUC {num(auc, 2)} {ci(interval, 2)}'
  if _null(ce.get('null')):
    stat += f' ({_null(ce.get("null"))})'
  stat += f'; {bimod}'
  significant = _significant(ce)
  if significant is None:  # no control test: fall back to the interval
    lo, hi = (interval if isinstance(interval, (list, tuple)) and len(interval) == 2
              else (float('nan'), float('nan')))
    if not (_finite(lo) and _finite(hi)):
      return f'`{est}`: no confidence interval, so no claim either way: {stat}.'
    significant = lo > 0.5 or hi < 0.5
  up = _direction(ce) > 0
  if n_towers > 2:
    if significant:
      what = ('closed-class items have sharper tower preferences than open-class items' if up
              else 'open-class items have sharper tower preferences than closed-class items')
    else:
      what = 'no clear difference between closed- and open-class items'
    return f'`{est}`: {what}: {stat}.'
  if significant:
    what = ('tower 0 prefers closed-class items (tower 1 open-class)' if up else
            'tower 1 prefers closed-class items (tower 0 open-class)')
  else:
    what = (f'no clear split between closed- and open-class items (at most a weak lean of '
            f'closed-class items to {"tower 0" if up else "tower 1"}, within what the control '
            'shows)')
  return f'`{est}`: {what}: {stat}.'


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
               f'{num(max(rhos), 2)} < {LOW_AGREEMENT}): its split may be an artefact of how it '
               'measures preference')
  return out


def _coverage(summary: dict[str, Any], per_est: dict[str, Any], ests: list[str]) -> str:
  """What the statistics rest on: items, positions, windows."""
  items = per_est[ests[0]].get('n_items')
  return (f"{count(items)} vocabulary items seen at least {count(summary.get('min_count'))} "
          f"times, among {count(summary.get('n_positions'))} scored positions in "
          f"{count(summary.get('n_eval_windows'))} held-out windows (checkpoint step "
          f"{count(summary.get('step'))}). Each split is tested against the same estimator on "
          'shuffled towers (p: the share of control draws at least as extreme).')


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
                   'min_count (bars) and the control (line). A split shows as a wider or '
                   'two-humped histogram than the control.'))
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
    out.append(WHY('no frequency bins in summary.json'))
  return out


def _enrichment(est, ps, figs) -> list:
  out = [H(3, 'Closed vs open class')]
  ce = ps.get('class_enrichment')
  if not ce:
    return out + [WHY('no class enrichment in summary.json (no word classes known)')]
  src = {'treebank': 'gold UPOS from a CoNLL-U treebank',
         'word_list': 'the word-class list analysis.word_classes',
         'function_words': 'the built-in English function-word list'}.get(ce.get('source'),
                                                                          str(ce.get('source')))
  out.append(P(f'Word classes from {md_escape(src)}. The control column is the AUC of the '
               'same estimator with the towers shuffled at each occurrence (mean ± sd over the '
               'control draws); p is the share of draws at least as far from its mean.'))
  out.append(TABLE(['AUC', '95% CI', 'control', 'p', 'closed items', 'open items',
                    'mean pref closed', 'mean pref open'],
                   [[num(ce.get('auc')), ci(ce.get('ci')), _control_cell(ce.get('null')),
                     num((ce.get('null') or {}).get('p')), count(ce.get('n_closed')),
                     count(ce.get('n_open')), num(ce.get('mean_pref_closed')),
                     num(ce.get('mean_pref_open'))]]))
  if 'class' in figs:
    out.append(FIG(figs['class'], f'`{est}` preference of closed-class vs open-class items. '
                   'Separated distributions = a syntax/semantics split between towers.'))
  return out


def _control_cell(test: Any) -> str:
  if not isinstance(test, dict) or not _finite(test.get('null_mean')):
    return 'n/a'
  return f"{num(test['null_mean'])} \u00b1 {num(test.get('null_sd'))}"


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
           'reads one tower only, so it is expected to be worse).')]
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


def _planted(est, ps, figs) -> list:
  pl = ps.get('planted')
  if not pl:
    return []
  out = [H(3, 'Planted classes')]
  out.append(P('The corpus was built with planted "syntax" and "topic" items; a model that '
               'splits them gives an AUC far from 0.5.'))
  out.append(TABLE(['AUC', '95% CI', 'control', 'p', 'syntax items', 'topic items'],
                   [[num(pl.get('auc')), ci(pl.get('ci')), _control_cell(pl.get('null')),
                     num((pl.get('null') or {}).get('p')), count(pl.get('n_syntax')),
                     count(pl.get('n_topic'))]]))
  if 'planted' in figs:
    out.append(FIG(figs['planted'], f'`{est}` preference by planted class.'))
  return out


def _estimator_section(est, ps, prefs, n_towers, figs) -> list:
  out = [H(2, f'Estimator `{est}`'),
         P(f"Per-tower value: {ps.get('description') or 'see docs/ANALYSIS.md'}. "
           f"Items with count >= min_count: {count(ps.get('n_items'))}. "
           f"Time {num(ps.get('seconds'), 1)} s, {num(ps.get('tokens_per_s'), 0)} tokens/s.")]
  out += _training(est, ps, figs)
  out += _distribution(est, ps, figs)
  out += _frequency(est, ps, figs)
  out += _enrichment(est, ps, figs)
  out += _top_items(est, ps, prefs, n_towers, figs)
  out += _planted(est, ps, figs)
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



def build_blocks(summary, prefs, token_view, struct, figs) -> list:
  """The report's content, independent of the output format."""
  n_towers = int(summary.get('n_towers') or 2)
  per_est = summary.get('per_estimator') or {}
  ests = [e for e in (summary.get('estimators') or list(per_est)) if e in per_est]
  blocks = [H(1, 'Tower preference report')]
  blocks.append(H(2, 'Headline'))
  if ests:
    blocks.append(P(_coverage(summary, per_est, ests)))
    blocks.append(UL([headline(e, per_est[e], n_towers) for e in ests]))
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
  for e in ests:
    blocks += _estimator_section(e, per_est[e], prefs, n_towers, figs.get(e, {}))
  blocks += _agreement(summary, figs.get('_all', {}))
  blocks += _structural(struct, figs.get('_all', {}))
  blocks += _token_view(token_view, n_towers)
  return blocks
