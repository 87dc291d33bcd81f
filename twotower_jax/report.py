"""The analysis report: report.md, report.html and figures/*.png from DIR/analysis alone.

Reads only the files `analyze` writes (preference.csv, summary.json,
token_view.json, structural_probe.json; docs/REPORT.md explains them to a
reader), so a report can be rebuilt or restyled without the model. The content
is built once as a list of blocks (heading, paragraph, table, figure, token
view) and rendered twice, to Markdown and to self-contained HTML, so the two
never disagree. Missing estimators or sections give a line saying why; NaN
prints as 'n/a'.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from twotower_jax import errors

PREFERENCE_CSV = 'preference.csv'
SUMMARY_JSON = 'summary.json'
TOKEN_VIEW_JSON = 'token_view.json'
STRUCT_JSON = 'structural_probe.json'
FIG_DIR = 'figures'
DPI = 110
TOP_K = 20
SPACE_PIECE = '\u2581'  # SentencePiece word-boundary marker '▁'
MARK_THRESHOLD = 0.25  # |lean| below this gets no tower marker in the Markdown token view
TOWER_COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b')
EST_MEANING = {
    'probe': 'mean log-likelihood of the item under a probe head trained on one tower alone',
    'ablation': 'mean drop in log-likelihood of the item when that tower is replaced by its mean',
    'gate': "mean posterior responsibility of the tower for the item (latent gate)",
}


class ReportError(errors.UserError):
  """Analysis files missing or unreadable; the message says which and how to fix it."""


# ---------------------------------------------------------------- reading


def _float(text: Any) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return float('nan')


def read_preferences(path: str) -> dict[str, Any]:
  """preference.csv as columns: text columns as strings, the rest as float arrays."""
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    fields = list(reader.fieldnames or [])
    rows = list(reader)
  for need in ('token_id', 'piece', 'count'):
    if need not in fields:
      raise ReportError(f'{path} has no {need!r} column; rerun analyze to rewrite it')
  text_cols = {'piece', 'word_class', 'upos', 'planted_class'}
  cols: dict[str, Any] = {}
  for name in fields:
    vals = [r.get(name) or '' for r in rows]
    cols[name] = vals if name in text_cols else np.array([_float(v) for v in vals])
  cols['_fields'] = fields
  return cols


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ReportError(f'{path} is not valid JSON ({e}); rerun analyze to rewrite it') from e


# ---------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def num(x: Any, digits: int = 3) -> str:
  """A number for the report: fixed decimals, 'n/a' for None/NaN/inf."""
  if isinstance(x, bool) or not _finite(x):
    return 'n/a'
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f'{float(x):.{digits}f}'


def count(x: Any) -> str:
  """An integer count, 'n/a' when missing."""
  return str(int(x)) if _finite(x) else 'n/a'


def ci(pair: Any, digits: int = 3) -> str:
  """'[lo, hi]' or 'n/a'."""
  if not isinstance(pair, (list, tuple)) or len(pair) != 2:
    return 'n/a'
  if not (_finite(pair[0]) and _finite(pair[1])):
    return 'n/a'
  return f'[{num(pair[0], digits)}, {num(pair[1], digits)}]'


def md_escape(text: str) -> str:
  """Makes arbitrary text (a piece) safe inside a Markdown table cell or paragraph."""
  text = str(text).replace('\\', '\\\\').replace('\n', ' ').replace('\r', ' ')
  return re.sub(r'([|`*_<>\[\]#])', r'\\\1', text)


def show_piece(piece: str) -> str:
  """A piece for a table: '▁' kept visible, control characters named."""
  return ''.join(c if c.isprintable() else f'\\x{ord(c):02x}' for c in str(piece)) or "''"


# ---------------------------------------------------------------- blocks


def H(level: int, text: str):  # pylint: disable=invalid-name
  return ('h', level, text)


def P(text: str):  # pylint: disable=invalid-name
  return ('p', text)


def UL(items: Sequence[str]):  # pylint: disable=invalid-name
  return ('ul', list(items))


def TABLE(header: Sequence[str], rows: Sequence[Sequence[str]]):  # pylint: disable=invalid-name
  return ('table', list(header), [list(r) for r in rows])


def FIG(rel_path: str, caption: str):  # pylint: disable=invalid-name
  return ('fig', rel_path, caption)


def WHY(text: str):  # pylint: disable=invalid-name
  """A skipped section: one line saying why."""
  return ('p', f'Not shown: {text}.')


# ---------------------------------------------------------------- statistics from the csv


def _scored(prefs: dict[str, Any], summary: dict[str, Any]) -> np.ndarray:
  """Items the statistics use: count >= min_count (summary), at least 1."""
  min_count = summary.get('min_count', 1)
  min_count = float(min_count) if _finite(min_count) else 1.0
  return prefs['count'] >= max(min_count, 1.0)


def _pref_col(prefs: dict[str, Any], est: str) -> np.ndarray | None:
  col = prefs.get(f'{est}_pref')
  return col if isinstance(col, np.ndarray) else None


def _tower_keys(top) -> list[str]:
  return sorted(top, key=lambda k: int(re.sub(r'\D', '', k) or 0))


def leaning_items(top: dict[str, Any], key: str, n_towers: int) -> list[dict[str, Any]]:
  """The top items of one tower; with two towers only those whose preference has its sign.

  (A tower-1 list padded with items of positive preference would show tower-0 items.)
  """
  items = list(top.get(key) or [])[:TOP_K]
  if n_towers <= 2 and key in ('tower_0', 'tower_1'):
    sign = 1.0 if key == 'tower_0' else -1.0
    items = [it for it in items if _finite(it.get('pref')) and sign * float(it['pref']) > 0]
  return items


# ---------------------------------------------------------------- sections


def _how_to_read(n_towers: int) -> list:
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
      UL([f'`{est}`: per-tower value = {meaning}.' for est, meaning in EST_MEANING.items()] +
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
        'The bracket is a 95% bootstrap confidence interval; if it contains 0.5 the data do '
        'not show a split.'),
      P('**Token view.** At the end, held-out text with each piece marked by the tower it leans '
        'to; report.html shows it in colour (blue = tower 0, orange = tower 1). '
        'docs/REPORT.md explains every figure.'),
      P('Counts are occurrences of the item among the scored evaluation positions; statistics '
        'use items seen at least `min_count` times. "n/a" marks a number that could not be '
        'computed (too few items, one class empty, constant values).'),
  ]


def headline(est: str, ps: dict[str, Any], n_towers: int) -> str:
  """One sentence per estimator stating the class split with its AUC and interval."""
  ce = ps.get('class_enrichment') or {}
  auc, interval = ce.get('auc'), ce.get('ci')
  control = ps.get('control') or {}
  stat = (f'AUC {num(auc, 2)} {ci(interval, 2)}; bimodality {num(ps.get("bimodality"), 2)} '
          f'vs {num(control.get("bimodality"), 2)} in the control')
  if not _finite(auc):
    return (f'`{est}`: no class split measurable (AUC n/a: too few closed- or open-class '
            f'items); bimodality {num(ps.get("bimodality"), 2)} vs '
            f'{num(control.get("bimodality"), 2)} in the control.')
  lo, hi = (interval if isinstance(interval, (list, tuple)) and len(interval) == 2
            else (float('nan'), float('nan')))
  known = _finite(lo) and _finite(hi)
  if n_towers > 2:
    if known and lo > 0.5:
      what = 'closed-class items have sharper tower preferences than open-class items'
    elif known and hi < 0.5:
      what = 'open-class items have sharper tower preferences than closed-class items'
    elif known:
      what = ('no clear difference between closed- and open-class items '
              '(the interval includes 0.5)')
    else:
      what = 'no confidence interval, so no claim either way'
    return f'`{est}`: {what}: {stat}.'
  if known and lo > 0.5:
    what = 'tower 0 prefers closed-class items (tower 1 open-class)'
  elif known and hi < 0.5:
    what = 'tower 1 prefers closed-class items (tower 0 open-class)'
  elif known:
    lean = 'tower 0' if auc > 0.5 else 'tower 1'
    what = (f'no clear split between closed- and open-class items (at most a weak lean of '
            f'closed-class items to {lean}; the interval includes 0.5)')
  else:
    what = 'no confidence interval, so no claim either way'
  return f'`{est}`: {what}: {stat}.'


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
         'function_words': 'the built-in English function-word list'}.get(ce.get('source'),
                                                                          str(ce.get('source')))
  out.append(P(f'Word classes from {md_escape(src)}.'))
  out.append(TABLE(['AUC', '95% CI', 'closed items', 'open items', 'mean pref closed',
                    'mean pref open'],
                   [[num(ce.get('auc')), ci(ce.get('ci')), count(ce.get('n_closed')),
                     count(ce.get('n_open')), num(ce.get('mean_pref_closed')),
                     num(ce.get('mean_pref_open'))]]))
  if 'class' in figs:
    out.append(FIG(figs['class'], f'`{est}` preference of closed-class vs open-class items. '
                   'Separated distributions = a syntax/semantics split between towers.'))
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
  out.append(TABLE(['AUC', '95% CI', 'syntax items', 'topic items'],
                   [[num(pl.get('auc')), ci(pl.get('ci')), count(pl.get('n_syntax')),
                     count(pl.get('n_topic'))]]))
  if 'planted' in figs:
    out.append(FIG(figs['planted'], f'`{est}` preference by planted class.'))
  return out


def _estimator_section(est, ps, prefs, n_towers, figs) -> list:
  out = [H(2, f'Estimator `{est}`'),
         P(f"Per-tower value: {EST_MEANING.get(est, 'see the analysis documentation')}. "
           f"Items with count >= min_count: {count(ps.get('n_items'))}. "
           f"Time {num(ps.get('seconds'), 1)} s, {num(ps.get('tokens_per_s'), 0)} tokens/s.")]
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


# ---------------------------------------------------------------- rendering: markdown


def _lean(x: Any) -> float:
  return float(x) if _finite(x) else float('nan')


def tokens_markdown(passages: Sequence[dict[str, Any]]) -> str:
  """Passages as text with a ⁰ or ¹ after each piece leaning clearly to tower 0 or 1."""
  lines = []
  for p in passages:
    parts = []
    for piece, lean in zip(p.get('pieces') or [], p.get('lean') or []):
      text = str(piece).replace(SPACE_PIECE, ' ')
      v = _lean(lean)
      mark = '' if not math.isfinite(v) or abs(v) < MARK_THRESHOLD else (
          '\u2070' if v > 0 else '\u00b9')
      parts.append(text + mark)
    lines.append(''.join(parts).strip())
  body = '\n\n'.join(lines)
  fence = '`' * max(3, max((len(m) for m in re.findall(r'`+', body)), default=0) + 1)
  legend = (f'Here a piece is followed by \u2070 when it leans to tower 0 and by \u00b9 when '
            f'it leans to tower 1 (|lean| >= {MARK_THRESHOLD}; weaker or unscored pieces have no '
            'mark).')
  return f'{legend}\n\n{fence}text\n{body}\n{fence}'


def to_markdown(blocks: Sequence[tuple]) -> str:
  """Renders the blocks as GitHub-flavoured Markdown."""
  out = []
  for b in blocks:
    kind = b[0]
    if kind == 'h':
      out.append('#' * b[1] + ' ' + b[2])
    elif kind == 'p':
      out.append(b[1])
    elif kind == 'ul':
      out.append('\n'.join(f'- {t}' for t in b[1]))
    elif kind == 'table':
      header, rows = b[1], b[2]
      lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
      lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
      out.append('\n'.join(lines))
    elif kind == 'fig':
      alt = os.path.splitext(os.path.basename(b[1]))[0]
      out.append(f'![{alt}]({b[1]})\n\n*{b[2]}*')
    elif kind == 'tokens':
      out.append(tokens_markdown(b[1]))
  return '\n\n'.join(out) + '\n'


# ---------------------------------------------------------------- rendering: html

_INLINE = re.compile(r'\\(.)|\*\*|`')
LEAN_RGB = {0: (31, 119, 180), 1: (255, 127, 14)}  # blue = tower 0, orange = tower 1
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;
 padding:0 1em;line-height:1.45;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}th{background:#f3f3f3}
code{background:#f3f3f3;padding:0 .2em;border-radius:3px}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:.85em;color:#555}
.passage{white-space:pre-wrap;font-family:Menlo,Consolas,monospace;font-size:.9em;line-height:1.9;
 border:1px solid #ddd;padding:.6em;margin:.6em 0}
.tok{border-radius:2px}.tok.ns{background:#e6e6e6;color:#888}
.legend span{display:inline-block;padding:0 .5em;margin-right:.4em;border-radius:2px}
"""


def inline_html(text: str) -> str:
  """The report's inline Markdown (**bold**, `code`, backslash escapes) as escaped HTML."""
  out, bold, code, pos = [], False, False, 0
  for m in _INLINE.finditer(text):
    out.append(html.escape(text[pos:m.start()]))
    pos = m.end()
    if m.group(1) is not None:
      out.append(html.escape(m.group(1)))
    elif m.group(0) == '**':
      out.append('</b>' if bold else '<b>')
      bold = not bold
    else:
      out.append('</code>' if code else '<code>')
      code = not code
  out.append(html.escape(text[pos:]))
  out += ['</code>'] * code + ['</b>'] * bold
  return ''.join(out)


def lean_style(lean: Any) -> tuple[str, str]:
  """(css class, inline style) of one piece: tower colour with alpha = |lean|, grey if unscored."""
  v = _lean(lean)
  if not math.isfinite(v):
    return 'tok ns', ''
  v = max(-1.0, min(1.0, v))
  r, g, b = LEAN_RGB[0 if v >= 0 else 1]
  return 'tok', f'background:rgba({r},{g},{b},{abs(v):.2f})'


def tokens_html(passages: Sequence[dict[str, Any]]) -> str:
  """Passages as coloured spans (one per piece), with a legend."""
  legend = ['<p class="legend">']
  for label, lean in (('tower 0 (strong)', 1.0), ('tower 0 (weak)', 0.3),
                      ('tower 1 (weak)', -0.3), ('tower 1 (strong)', -1.0),
                      ('not scored', None)):
    cls, style = lean_style(lean)
    legend.append(f'<span class="{cls}" style="{style}">{html.escape(label)}</span>')
  legend.append('</p>')
  out = [''.join(legend)]
  for p in passages:
    spans = []
    leans = list(p.get('lean') or [])
    for i, piece in enumerate(p.get('pieces') or []):
      lean = leans[i] if i < len(leans) else None
      cls, style = lean_style(lean)
      v = _lean(lean)
      title = f'lean {v:+.2f}' if math.isfinite(v) else 'not scored'
      text = html.escape(str(piece).replace(SPACE_PIECE, ' '))
      spans.append(f'<span class="{cls}" style="{style}" title="{title}">{text}</span>')
    out.append('<div class="passage">' + ''.join(spans) + '</div>')
  return '\n'.join(out)


def to_html(blocks: Sequence[tuple], analysis_dir: str) -> str:
  """Renders the blocks as one self-contained HTML page (figures as base64 data URIs)."""
  body = []
  for b in blocks:
    kind = b[0]
    if kind == 'h':
      body.append(f'<h{b[1]}>{inline_html(b[2])}</h{b[1]}>')
    elif kind == 'p':
      body.append(f'<p>{inline_html(b[1])}</p>')
    elif kind == 'ul':
      body.append('<ul>' + ''.join(f'<li>{inline_html(t)}</li>' for t in b[1]) + '</ul>')
    elif kind == 'table':
      head = ''.join(f'<th>{inline_html(h)}</th>' for h in b[1])
      rows = ''.join('<tr>' + ''.join(f'<td>{inline_html(c)}</td>' for c in r) + '</tr>'
                     for r in b[2])
      body.append(f'<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
    elif kind == 'fig':
      with open(os.path.join(analysis_dir, b[1]), 'rb') as f:
        data = base64.b64encode(f.read()).decode('ascii')
      cap = inline_html(b[2])
      body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[1])}">'
                  f'<figcaption>{cap}</figcaption></figure>')
    elif kind == 'tokens':
      body.append(tokens_html(b[1]))
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          '<title>Tower preference report</title>'
          f'<style>{CSS}</style></head><body>\n' + '\n'.join(body) + '\n</body></html>\n')


# ---------------------------------------------------------------- figures


def _new_fig(w: float, h: float, nrows: int = 1, ncols: int = 1):
  """A pyplot-free Agg figure (no global state, safe in any process)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(w, h), dpi=DPI)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def _save(fig, analysis_dir: str, name: str) -> str:
  """Saves under figures/ and returns the path relative to analysis_dir."""
  rel = f'{FIG_DIR}/{name}.png'
  fig.tight_layout()
  fig.savefig(os.path.join(analysis_dir, rel), dpi=DPI)
  return rel


def _plain(text: Any) -> str:
  """Text for a figure label: a '$' in a piece must not start matplotlib's math mode."""
  return str(text).replace('$', r'\$')


def fig_histogram(d, est, ps, n_towers):
  h = ps.get('histogram') or {}
  edges = np.asarray(h.get('edges') or [], dtype=float)
  counts = np.asarray(h.get('counts') or [], dtype=float)
  if edges.size < 2 or counts.size != edges.size - 1:
    return None
  fig, ax = _new_fig(6, 3.4)
  ax = ax[0, 0]
  ax.bar(edges[:-1], counts, width=np.diff(edges), align='edge', color=TOWER_COLORS[0],
         alpha=0.7, label=f'{est} (bimodality {num(ps.get("bimodality"))})')
  ctrl = np.asarray(h.get('control_counts') or [], dtype=float)
  if ctrl.size == counts.size:
    control = ps.get('control') or {}
    ax.step(edges, np.append(ctrl, ctrl[-1:]), where='post', color='k',
            label=f'control: {_plain(control.get("kind", "?"))} (bimodality '
                  f'{num(control.get("bimodality"))})')
  ax.axvline(0, color='grey', lw=0.8, ls=':')
  ax.set_xlabel('preference  (+ = tower 0, - = tower 1)' if n_towers <= 2 else
                'preference  (best tower minus the others)')
  ax.set_ylabel('items')
  ax.set_title(f'{est}: preference histogram vs control')
  ax.legend(fontsize=7)
  return _save(fig, d, f'{est}_histogram')


def _class_masks(prefs, mask):
  wc = np.array(prefs.get('word_class') or [''] * len(mask))
  return mask & (wc == 'closed'), mask & (wc == 'open'), mask & (wc != 'closed') & (wc != 'open')


def fig_frequency(d, est, ps, prefs, scored):
  pref = _pref_col(prefs, est)
  if pref is None:
    return None
  ok = scored & np.isfinite(pref) & (prefs['count'] > 0)
  if not ok.any():
    return None
  fig, ax = _new_fig(6, 3.6)
  ax = ax[0, 0]
  closed, opn, other = _class_masks(prefs, ok)
  for m, c, lab in ((other, '#c7c7c7', 'unknown class'), (opn, '#2ca02c', 'open class'),
                    (closed, '#9b59b6', 'closed class')):
    if m.any():
      ax.scatter(prefs['count'][m], pref[m], s=8, color=c, alpha=0.7, label=lab, lw=0)
  bins = [b for b in ((ps.get('frequency') or {}).get('bins') or [])
          if _finite(b.get('lo')) and _finite(b.get('hi')) and _finite(b.get('mean_pref'))]
  if bins:
    x = [math.sqrt(max(b['lo'], 1) * max(b['hi'], 1)) for b in bins]
    ax.plot(x, [b['mean_pref'] for b in bins], 'k-o', ms=4, label='bin mean')
  ax.set_xscale('log')
  ax.axhline(0, color='grey', lw=0.8, ls=':')
  fr = ps.get('frequency') or {}
  ax.set_title(f"{est}: preference vs frequency (Spearman {num(fr.get('spearman_logfreq'), 2)} "
               f"{ci(fr.get('ci'), 2)})", fontsize=9)
  ax.set_xlabel('count (occurrences in the scored positions, log scale)')
  ax.set_ylabel('preference')
  ax.legend(fontsize=7)
  return _save(fig, d, f'{est}_frequency')


def fig_classes(d, est, ps, prefs, scored):
  pref = _pref_col(prefs, est)
  ce = ps.get('class_enrichment') or {}
  if pref is None:
    return None
  ok = scored & np.isfinite(pref)
  closed, opn, _ = _class_masks(prefs, ok)
  if not (closed.any() or opn.any()):
    return None
  fig, ax = _new_fig(6, 3.4)
  ax = ax[0, 0]
  vals = pref[closed | opn]
  edges = np.linspace(vals.min(), vals.max() + 1e-9, 26)
  for m, c, lab in ((closed, '#9b59b6', 'closed class'), (opn, '#2ca02c', 'open class')):
    if m.any():
      ax.hist(pref[m], bins=edges, density=True, histtype='stepfilled', alpha=0.45, color=c,
              label=f'{lab} (n={int(m.sum())}, mean {num(pref[m].mean(), 2)})')
  ax.axvline(0, color='grey', lw=0.8, ls=':')
  ax.set_title(f"{est}: closed vs open class, AUC {num(ce.get('auc'), 2)} "
               f"{ci(ce.get('ci'), 2)}", fontsize=9)
  ax.set_xlabel('preference')
  ax.set_ylabel('density')
  ax.legend(fontsize=7)
  return _save(fig, d, f'{est}_classes')


def fig_top(d, est, ps, n_towers=2):
  top = ps.get('top_items') or {}
  keys = [k for k in _tower_keys(top) if leaning_items(top, k, n_towers)]
  if not keys:
    return None
  n = max(len(leaning_items(top, k, n_towers)) for k in keys)
  fig, axes = _new_fig(3.2 * len(keys), 0.6 + 0.2 * n, 1, len(keys))
  for j, key in enumerate(keys):
    ax = axes[0, j]
    items = leaning_items(top, key, n_towers)
    y = np.arange(len(items))[::-1]
    vals = [float(it['pref']) if _finite(it.get('pref')) else 0.0 for it in items]
    ax.barh(y, vals, color=TOWER_COLORS[int(re.sub(r'\D', '', key) or 0) % len(TOWER_COLORS)])
    ax.set_yticks(y)
    ax.set_yticklabels([_plain(f"{show_piece(it.get('piece', ''))} ({count(it.get('count'))})")
                        for it in items], fontsize=7)
    ax.axvline(0, color='grey', lw=0.8)
    ax.set_title(f"{est}: {key.replace('_', ' ')}", fontsize=9)
    ax.set_xlabel('preference', fontsize=8)
  return _save(fig, d, f'{est}_top_items')


def fig_planted(d, est, ps, prefs, scored):
  pref = _pref_col(prefs, est)
  planted = prefs.get('planted_class')
  if pref is None or not planted or not ps.get('planted'):
    return None
  pc = np.array(planted)
  ok = scored & np.isfinite(pref)
  labels = sorted({c for c in pc[ok] if c})
  if not labels:
    return None
  fig, ax = _new_fig(6, 3.2)
  ax = ax[0, 0]
  vals = pref[ok & (pc != '')]
  edges = np.linspace(vals.min(), vals.max() + 1e-9, 26)
  for i, lab in enumerate(labels):
    m = ok & (pc == lab)
    ax.hist(pref[m], bins=edges, histtype='stepfilled', alpha=0.5,
            color=TOWER_COLORS[(i + 2) % len(TOWER_COLORS)],
            label=_plain(f'{lab} (n={int(m.sum())})'))
  pl = ps['planted']
  ax.set_title(f"{est}: planted classes, AUC {num(pl.get('auc'), 2)} {ci(pl.get('ci'), 2)}",
               fontsize=9)
  ax.set_xlabel('preference')
  ax.set_ylabel('items')
  ax.legend(fontsize=7)
  return _save(fig, d, f'{est}_planted')


def _agreement_of(agr, a, b):
  return agr.get(f'{a}~{b}') or agr.get(f'{b}~{a}') or {}


def fig_agreement(d, ests, summary, prefs, scored):
  cols = [(e, _pref_col(prefs, e)) for e in ests]
  cols = [(e, c) for e, c in cols if c is not None]
  if len(cols) < 2:
    return None
  pairs = [(i, j) for i in range(len(cols)) for j in range(i + 1, len(cols))]
  fig, axes = _new_fig(3.2 * len(pairs), 3.2, 1, len(pairs))
  agr = summary.get('agreement') or {}
  for p, (i, j) in enumerate(pairs):
    (ea, a), (eb, b) = cols[i], cols[j]
    ok = scored & np.isfinite(a) & np.isfinite(b)
    ax = axes[0, p]
    ax.scatter(a[ok], b[ok], s=6, alpha=0.6, lw=0, color='#555555')
    ag = _agreement_of(agr, ea, eb)
    ax.axhline(0, color='grey', lw=0.6, ls=':')
    ax.axvline(0, color='grey', lw=0.6, ls=':')
    ax.set_title(f"{ea} vs {eb}\nSpearman {num(ag.get('spearman'), 2)} {ci(ag.get('ci'), 2)}",
                 fontsize=8)
    ax.set_xlabel(f'{ea} preference', fontsize=8)
    ax.set_ylabel(f'{eb} preference', fontsize=8)
  return _save(fig, d, 'agreement')


def fig_structural(d, sp):
  uuas, dspr, layers = sp.get('uuas') or [], sp.get('dspr') or [], sp.get('layers') or []
  if not uuas or not layers:
    return None
  fig, axes = _new_fig(8, 3.2, 1, 2)
  x = np.arange(len(layers))
  for name, data, ax in (('UUAS', uuas, axes[0, 0]), ('DSpr', dspr, axes[0, 1])):
    for k, row in enumerate(data):
      y = np.array([v if _finite(v) else np.nan for v in row], dtype=float)
      ax.plot(x[:len(y)], y, '-o', ms=4, color=TOWER_COLORS[k % len(TOWER_COLORS)],
              label=f'tower {k}')
    if name == 'UUAS' and _finite(sp.get('baseline_uuas_adjacent')):
      ax.axhline(sp['baseline_uuas_adjacent'], color='k', ls='--', lw=0.8,
                 label='adjacent-word baseline')
    ax.set_xticks(x)
    ax.set_xticklabels([str(n) for n in layers], rotation=45, ha='right', fontsize=7)
    ax.set_title(f'structural probe: {name} per layer', fontsize=9)
    ax.set_ylabel(name)
    ax.legend(fontsize=7)
  return _save(fig, d, 'structural_probe')


def make_figures(analysis_dir, summary, prefs, struct) -> dict[str, dict[str, str]]:
  """Writes figures/*.png; returns {est or '_all': {figure kind: relative path}}."""
  os.makedirs(os.path.join(analysis_dir, FIG_DIR), exist_ok=True)
  per_est = summary.get('per_estimator') or {}
  ests = [e for e in (summary.get('estimators') or list(per_est)) if e in per_est]
  scored = _scored(prefs, summary)
  figs: dict[str, dict[str, str]] = {}
  for est in ests:
    ps = per_est[est]
    made = {'hist': fig_histogram(analysis_dir, est, ps, int(summary.get('n_towers') or 2)),
            'freq': fig_frequency(analysis_dir, est, ps, prefs, scored),
            'class': fig_classes(analysis_dir, est, ps, prefs, scored),
            'top': fig_top(analysis_dir, est, ps, int(summary.get('n_towers') or 2)),
            'planted': fig_planted(analysis_dir, est, ps, prefs, scored)}
    figs[est] = {k: v for k, v in made.items() if v}
  made = {'agreement': fig_agreement(analysis_dir, ests, summary, prefs, scored),
          'struct': fig_structural(analysis_dir, struct) if struct else None}
  figs['_all'] = {k: v for k, v in made.items() if v}
  return figs


# ---------------------------------------------------------------- main


def build_blocks(summary, prefs, token_view, struct, figs) -> list:
  """The report's content, independent of the output format."""
  n_towers = int(summary.get('n_towers') or 2)
  per_est = summary.get('per_estimator') or {}
  ests = [e for e in (summary.get('estimators') or list(per_est)) if e in per_est]
  blocks = [H(1, 'Tower preference report')]
  blocks += _how_to_read(n_towers)
  blocks.append(H(2, 'Headline'))
  if ests:
    blocks.append(UL([headline(e, per_est[e], n_towers) for e in ests]))
  else:
    blocks.append(WHY('no estimator ran, so there is no preference to report'))
  for e in (e for e in EST_MEANING if e not in ests):
    if e == 'gate' and summary.get('gate') != 'latent':
      why = (f"no latent gate: gate estimator not run (this model's gate is "
             f"'{md_escape(str(summary.get('gate', 'n/a')))}'; only model.gate=latent has "
             'per-token responsibilities)')
    else:
      why = f'{e} estimator not run (not selected for this analysis)'
    blocks.append(WHY(why))
  blocks += _overview(summary)
  for e in ests:
    blocks += _estimator_section(e, per_est[e], prefs, n_towers, figs.get(e, {}))
  blocks += _agreement(summary, figs.get('_all', {}))
  blocks += _structural(struct, figs.get('_all', {}))
  blocks += _token_view(token_view, n_towers)
  return blocks


def write_report(analysis_dir: str) -> dict[str, Any]:
  """Writes report.md, report.html and figures/*.png under analysis_dir; returns their paths."""
  pref_path = os.path.join(analysis_dir, PREFERENCE_CSV)
  sum_path = os.path.join(analysis_dir, SUMMARY_JSON)
  for path in (pref_path, sum_path):
    if not os.path.exists(path):
      raise ReportError(f'{path} is missing; run `python -m twotower_jax.analyze '
                        '--workdir=DIR` first (it writes DIR/analysis/)')
  summary = _read_json(sum_path)
  prefs = read_preferences(pref_path)
  tv_path = os.path.join(analysis_dir, TOKEN_VIEW_JSON)
  token_view = _read_json(tv_path) if os.path.exists(tv_path) else None
  sp_path = os.path.join(analysis_dir, STRUCT_JSON)
  struct = _read_json(sp_path) if os.path.exists(sp_path) else summary.get('structural_probe')
  figs = make_figures(analysis_dir, summary, prefs, struct)
  blocks = build_blocks(summary, prefs, token_view, struct, figs)
  md_path = os.path.join(analysis_dir, 'report.md')
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(to_markdown(blocks))
  html_path = os.path.join(analysis_dir, 'report.html')
  with open(html_path, 'w', encoding='utf-8') as f:
    f.write(to_html(blocks, analysis_dir))
  return {'report_md': md_path, 'report_html': html_path, 'figures': figs}
