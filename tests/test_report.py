"""The report from synthetic analysis files (the analysis contract), no model needed."""

import csv
import html
from html import parser as html_parser
import json
import math
import os
import re

import numpy as np
import pytest

from twotower_jax import report
from twotower_jax.analysis import multiplicity
from twotower_jax.report import figures
from twotower_jax.report import format as fmt
from twotower_jax.report import render

ODD_PIECE = '<b>|'


def _pieces(v):
  base = ['\u2581the', ',', '\u2581of', '\u2581people', ODD_PIECE, '\u2581war', 's', '&amp;']
  return [base[i] if i < len(base) else f'\u2581w{i}' for i in range(v)]


def class_block(auc, interval, p, two_towers=True, n=(18, 17)):
  """A class test block as the analysis writes it (summary.class_block): the adjusted AUC,
  both classes' leans and the test's p."""
  up = auc > 0.5
  test = {'auc_unadjusted': auc - 0.02, 'p': p,
          'association': {'auc': auc, 'ci': interval, 'p_greater': p / 2, 'p_less': 1.0},
          'direction': ('positive->0' if up else 'positive->1') if two_towers else
                       ('positive_sharper' if up else 'negative_sharper')}
  if two_towers:
    test['lean_positive'] = {'median': 0.2 if up else -0.2, 'p_positive': p / 2 if up else 0.9,
                             'p_negative': 0.9 if up else p / 2}
    test['lean_negative'] = {'median': -0.1 if up else 0.1, 'p_positive': 0.9 if up else p / 2,
                             'p_negative': p / 2 if up else 0.9}
  return {'n_positive': n[0], 'n_negative': n[1], 'mean_pref_positive': 0.2,
          'mean_pref_negative': -0.1, 'auc_normalized': auc + 0.01, 'test': test, 'auc': auc,
          'ci': interval, 'auc_unadjusted': auc - 0.02, 'p': p}


def make_analysis(root, n_towers=2, estimators=('probe', 'ablation'), struct=True,
                  token_view=True, planted=False, v=40, seed=0):
  """Writes preference.csv, summary.json (and optional files) per the analysis contract."""
  rng = np.random.default_rng(seed)
  out = os.path.join(str(root), 'analysis')
  os.makedirs(out, exist_ok=True)
  pieces = _pieces(v)
  counts = rng.integers(0, 50, size=v)
  counts[:6] = [100, 80, 60, 3, 1, 0]
  cls = ['closed', 'closed', 'closed', 'open', '', 'open'] + [
      ['closed', 'open'][i % 2] for i in range(6, v)]
  header = ['token_id', 'piece', 'count', 'word_class', 'upos']
  cols = {'token_id': list(range(v)), 'piece': pieces, 'count': counts.tolist(),
          'word_class': cls, 'upos': ['DET' if c == 'closed' else 'NOUN' for c in cls]}
  top = {}
  for est in estimators:
    vals = rng.normal(size=(n_towers, v))
    for k in range(n_towers):
      header.append(f'{est}_t{k}')
      cols[f'{est}_t{k}'] = vals[k]
    if n_towers == 2:
      pref = vals[0] - vals[1]
    else:
      best = vals.argmax(0)
      pref = vals.max(0) - (vals.sum(0) - vals.max(0)) / (n_towers - 1)
      header.append(f'{est}_best')
      cols[f'{est}_best'] = best
    lo, hi = pref - 0.3, pref + 0.3
    lo[counts < 2], hi[counts < 2] = np.nan, np.nan
    pref = np.where(counts == 0, np.nan, pref)
    header += [f'{est}_pref', f'{est}_pref_lo', f'{est}_pref_hi']
    cols.update({f'{est}_pref': pref, f'{est}_pref_lo': lo, f'{est}_pref_hi': hi})
    order = np.argsort(np.nan_to_num(-pref, nan=np.inf))
    top[est] = {f'tower_{k}': [
        {'piece': pieces[i], 'token_id': int(i), 'count': int(counts[i]), 'pref': float(pref[i])}
        for i in (order[:20] if k == 0 else order[::-1][:20]) if np.isfinite(pref[i])]
                for k in range(n_towers)}
  if planted:
    header.append('planted_class')
    cols['planted_class'] = [['syntax', 'topic', ''][i % 3] for i in range(v)]
  with open(os.path.join(out, 'preference.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(header)
    for i in range(v):
      w.writerow([cols[h][i] for h in header])
  aucs = {'probe': (0.71, [0.66, 0.76]), 'ablation': (0.52, [0.45, 0.58]),
          'gate': (0.27, [0.2, 0.33])}
  per = {}
  for j, est in enumerate(estimators):
    auc, interval = aucs[est]
    per[est] = {
        'n_items': int((counts >= 2).sum()), 'bimodality': 0.61,
        'control': {'kind': 'shuffled_labels', 'bimodality': 0.34},
        'histogram': {'edges': np.linspace(-3, 3, 11).tolist(),
                      'counts': [1, 2, 3, 5, 8, 8, 5, 3, 2, 1],
                      'control_counts': [0, 1, 3, 6, 9, 9, 6, 3, 1, 0]},
        'frequency': {'spearman_logfreq': 0.12, 'ci': [float('nan'), 0.3] if j else [0.01, 0.2],
                      'bins': [{'lo': 2, 'hi': 10, 'n': 12, 'mean_pref': 0.1, 'auc_closed': 0.6},
                               {'lo': 10, 'hi': 100, 'n': 20, 'mean_pref': float('nan'),
                                'auc_closed': float('nan')}]},
        'prefer': {'statistic': 0.3, 'null': {'null_mean': 0.1, 'null_sd': 0.01, 'p': 0.001,
                                              'n_null': 999}},
        'class_enrichment': dict(class_block(auc, interval, 0.0004 if abs(auc - 0.5) > 0.1
                                             else 0.52, n_towers <= 2), source='function_words'),
        'punct': dict(class_block(0.55, [0.3, 0.8], 0.7, n_towers <= 2, (3, 17)),
                      source='function_words'),
        'n_fragments': 1,
        'top_items': top[est], 'seconds': 1.5, 'tokens_per_s': 1234.0,
        'description': f'what {est} measures',
    }
    if planted:
      per[est]['planted'] = class_block(0.93, [0.88, 0.97], 0.0002, n_towers <= 2, (13, 13))
  agreement = {}
  for a in range(len(estimators)):
    for b in range(a + 1, len(estimators)):
      agreement[f'{estimators[a]}~{estimators[b]}'] = {'spearman': 0.8, 'ci': [0.7, 0.9], 'n': 30}
  sp = None
  if struct:
    sp = {'layers': ['embed', 'layer_0', 'layer_1'], 'n_towers': n_towers,
          'uuas': [[0.3 + 0.05 * k + 0.1 * j for j in range(3)] for k in range(n_towers)],
          'dspr': [[0.4, float('nan'), 0.6] for _ in range(n_towers)],
          'baseline_uuas_adjacent': 0.45, 'n_test_sentences': 20}
    with open(os.path.join(out, 'structural_probe.json'), 'w') as f:
      json.dump(sp, f)
  summary = {'workdir': str(root), 'step': 100, 'n_towers': n_towers, 'tower_type': 'gpt',
             'gate': 'latent' if 'gate' in estimators else 'concat', 'n_positions': 4000,
             'n_eval_windows': 8, 'min_count': 2, 'estimators': list(estimators),
             'estimators_skipped': ({} if 'gate' in estimators else
                                    {'gate': 'needs a mixture gate (this run: concat)'}),
             'eval_loss': 4.2, 'per_estimator': per, 'agreement': agreement,
             'tests': multiplicity.family(per, f'{estimators[-1]}/class', 0.05),
             'word_class_source': 'function_words',
             'structural_probe': sp, 'token_view_estimator': estimators[0]}
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  if token_view:
    passages = [{'pieces': ['\u2581The', ODD_PIECE, '\u2581war', 's', '.'],
                 'lean': [0.9, -0.5, None, float('nan'), 0.1]},
                {'pieces': ['\u2581of', '&amp;', '\u2581people'], 'lean': [-1.0, 0.0, 0.3]}]
    with open(os.path.join(out, 'token_view.json'), 'w') as f:
      json.dump({'estimator': estimators[0], 'note': 'item preference scaled to [-1, 1]',
                 'passages': passages}, f)
  return out, summary


def _md(out):
  with open(os.path.join(out, 'report.md'), encoding='utf-8') as f:
    return f.read()


def _headline(md, est):
  """The headline bullet of one estimator."""
  section = md[md.index('## Headline'):]
  return next(l for l in section.splitlines() if l.startswith(f'- `{est}`:'))


@pytest.fixture(scope='module')
def two_towers(tmp_path_factory):
  """One full two-tower report (every section), shared by the tests that only read it."""
  out, summary = make_analysis(tmp_path_factory.mktemp('two_towers'), planted=True)
  return out, summary, report.write_report(out)


def test_markdown_two_towers_headline_and_tables(two_towers):
  out, summary, res = two_towers
  md = _md(out)
  assert res['report_md'] == os.path.join(out, 'report.md')
  assert md.index('Headline') < md.index('How to read this report')  # the answer first
  assert '34 vocabulary items seen at least 2 times, among 4000 scored positions in 8' in md
  for est in summary['estimators']:
    ce = summary['per_estimator'][est]['class_enrichment']
    stat = f"adjusted AUC {ce['auc']:.3f} [{ce['ci'][0]:.3f}, {ce['ci'][1]:.3f}]"
    line = _headline(md, est)
    assert stat in line, (stat, line)
    assert 'some items prefer a tower: mean squared preference 0.3000, 3.0x' in line
  probe_line = _headline(md, 'probe')
  assert '**class split: function words lean to tower 0, content words to tower 1**' in probe_line
  assert 'p = 0.0004, Holm-adjusted p = 0.002' in probe_line
  assert 'function words to tower 0 (median 0.200, p = 0.0002)' in probe_line
  assert '(p \u2264 0.001, Holm-adjusted p = 0.004)' in probe_line  # the shuffled-tower floor
  abl_line = _headline(md, 'ablation')
  assert 'no class split between function words and content words shown' in abl_line
  assert 'p = 0.520 (the primary test)' in abl_line and 'split: function' not in abl_line
  assert 'Primary test `ablation/class`' in md and 'not rejected' in md
  assert ('| function vs content words | 0.710 | [0.660, 0.760] | 0.690 | 0.720 | 18 / 17 | '
          '0.200 / -0.100 | 0.0004 |') in md
  assert '| ablation/class (primary) |' in md  # the table of tests
  # The odd piece is escaped in tables: its pipe never splits a cell.
  assert '\\<b\\>\\|' in md
  for line in md.splitlines():
    if line.startswith('| ') and ODD_PIECE[:2] in line.replace('\\', ''):
      assert line.count('|') - line.count('\\|') == 8  # 7 columns
  assert 'n/a' in md  # NaN bins and CIs print as n/a
  assert not re.search(r'\bnan\b', md, re.I)
  assert 'Not shown: estimator gate did not run: needs a mixture gate' in md
  assert '| probe~ablation | 0.800 | [0.700, 0.900] | 30 |' in md
  tower1 = md[md.index('**tower 1 (most negative preference)**'):
              md.index('## Estimator `ablation`')]
  prefs1 = [float(l.split(' | ')[4]) for l in tower1.splitlines() if re.match(r'\| \d+ \|', l)]
  assert prefs1 and all(p < 0 for p in prefs1)  # tower-0 items never pad the tower-1 list
  assert f'Only {len(prefs1)} items with count >= min_count lean to this tower.' in tower1
  assert 'Best UUAS per tower: tower 0 0.500 (layer\\_1); tower 1 0.550 (layer\\_1).' in md
  assert '| this model | 0.610 |' in md  # the bimodality against its control
  assert 'baseline' in md.lower() and '| 1 | layer\\_0 | 0.450 | n/a |' in md


def test_markdown_missing_sections_say_why(tmp_path):
  out, _ = make_analysis(tmp_path, estimators=('probe',), struct=False, token_view=False)
  report.write_report(out)
  md = _md(out)
  assert 'Not shown: only 1 estimator(s) ran (probe); agreement needs two or more.' in md
  assert 'Not shown: no structural probe: analysis.struct_conllu was not set' in md
  assert 'Not shown: token_view.json is missing' in md
  assert 'Not shown: estimator gate did not run: needs a mixture gate (this run: concat).' in md
  assert '`probe`: per-tower value = what probe measures.' in md
  assert not re.search(r'\bnan\b', md)


def test_three_towers_and_gate(tmp_path):
  out, summary = make_analysis(tmp_path, n_towers=3, estimators=('probe', 'gate'), planted=True)
  report.write_report(out)
  md = _md(out)
  gate_line = _headline(md, 'gate')
  assert 'content words have sharper tower preferences than function words' in gate_line
  assert 'adjusted AUC 0.270 [0.200, 0.330]' in gate_line
  assert '**tower 2**' in md
  assert 'Planted classes' in md and '| syntax vs topic items | 0.930 | [0.880, 0.970] |' in md
  assert 'did not run' not in md
  assert list(summary['agreement']) == ['probe~gate'] and '| probe~gate |' in md


def test_missing_inputs_raise_user_error(tmp_path):
  with pytest.raises(report.ReportError, match='summary.json|preference.csv'):
    report.write_report(str(tmp_path))


def test_number_formatting():
  assert fmt.num(float('nan')) == 'n/a' and fmt.num(None) == 'n/a'
  assert fmt.num(0.12345) == '0.123' and fmt.num(3) == '3'
  assert fmt.ci([0.1, float('nan')]) == 'n/a' and fmt.ci([0.1, 0.2], 2) == '[0.10, 0.20]'
  assert fmt.md_escape('a|b*c&amp;') == 'a\\|b\\*c\\&amp;'
  assert math.isnan(render._lean(None))  # pylint: disable=protected-access


def _check_png(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert os.path.getsize(path) > 1000, path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.size[0] > 100 and im.size[1] > 100


def test_figures_written_and_linked(two_towers):
  out, summary, res = two_towers
  md = _md(out)
  expected = {'agreement.png', 'structural_probe.png'}
  for est in summary['estimators']:
    expected |= {f'{est}_{k}.png' for k in ('histogram', 'frequency', 'classes', 'top_items',
                                           'planted')}
  assert set(os.listdir(os.path.join(out, 'figures'))) == expected
  for name in expected:
    _check_png(os.path.join(out, 'figures', name))
    assert f'](figures/{name})' in md
  assert res['figures']['_all']['struct'] == 'figures/structural_probe.png'


def test_figures_three_towers_without_optional_parts(tmp_path):
  out, _ = make_analysis(tmp_path, n_towers=3, estimators=('gate',), struct=False)
  report.write_report(out)
  names = set(os.listdir(os.path.join(out, 'figures')))
  assert names == {f'gate_{k}.png' for k in ('histogram', 'frequency', 'classes', 'top_items')}
  for name in names:
    _check_png(os.path.join(out, 'figures', name))


def test_dollar_pieces_do_not_break_figures(tmp_path):
  ps = {'top_items': {'tower_0': [{'piece': '$5', 'token_id': 1, 'count': 3, 'pref': 1.0},
                                  {'piece': 'a$^b$', 'token_id': 2, 'count': 4, 'pref': 0.5}],
                      'tower_1': [{'piece': '$', 'token_id': 3, 'count': 2, 'pref': -0.2}]}}
  os.makedirs(tmp_path / 'figures')
  rel = figures.fig_top(str(tmp_path), 'probe', ps)
  _check_png(os.path.join(str(tmp_path), rel))


def test_html_self_contained_escaped_with_token_view(two_towers):
  out, summary, res = two_towers
  with open(res['report_html'], encoding='utf-8') as f:
    page = f.read()
  assert page.startswith('<!DOCTYPE html>') and page.rstrip().endswith('</html>')
  assert ODD_PIECE not in page and '&lt;b&gt;|' in page
  assert '&amp;amp;' in page  # a piece '&amp;' is shown literally
  assert 'src="figures/' not in page
  n_figs = len(os.listdir(os.path.join(out, 'figures')))
  assert page.count('src="data:image/png;base64,') == n_figs
  with open(os.path.join(out, 'token_view.json')) as f:
    tv = json.load(f)
  spans = re.findall(r'<span class="tok[^"]*" style="[^"]*" title="[^"]*">(.*?)</span>', page)
  assert len(spans) == sum(len(p['pieces']) for p in tv['passages'])
  assert spans[0] == ' The' and spans[1] == '&lt;b&gt;|'  # '▁' shown as a space
  assert 'title="not scored"' in page and 'rgba(31,119,180,0.90)' in page
  assert 'rgba(255,127,14,1.00)' in page
  ce = summary['per_estimator']['probe']['class_enrichment']
  assert f"AUC {ce['auc']:.3f} [{ce['ci'][0]:.3f}, {ce['ci'][1]:.3f}]" in page
  assert '<strong>' in page and '**' not in page
  md = _md(out)
  assert 'The\u2070<b>|\u00b9 wars.' in md and 'of\u00b9&amp; people\u2070' in md


def test_inline_html():
  assert render.inline_html('**a** `b` c\\|d <x>') == ('<strong>a</strong> <code>b</code> c|d '
                                                      '&lt;x&gt;')
  assert render.lean_style(None)[0] == 'tok ns' and render.lean_style(float('nan'))[0] == 'tok ns'


def test_one_tower_split_control_model(tmp_path):
  out, summary = make_analysis(tmp_path, estimators=('ablation',), struct=False)
  summary['n_towers'] = 1
  summary['per_estimator']['ablation']['control']['kind'] = 'split_single_tower'
  summary['per_estimator']['ablation']['class_enrichment']['ci'] = [None, None]
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  report.write_report(out)
  md = _md(out)
  assert 'This is a one-tower model' in md and 'split\\_single\\_tower' in md
  line = _headline(md, 'ablation')
  assert 'adjusted AUC 0.520 n/a' in line and 'no class split' in line
  assert '**tower 1 (most negative preference)**' in md


def test_degenerate_estimator_does_not_fail(tmp_path):
  out, summary = make_analysis(tmp_path, estimators=('probe',), struct=False)
  summary['per_estimator']['probe'] = {
      'n_items': 0, 'bimodality': None, 'control': {}, 'histogram': {'edges': [], 'counts': []},
      'frequency': None, 'class_enrichment': None, 'top_items': {}}
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  with open(os.path.join(out, 'preference.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(out, 'preference.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
      w.writerow({**r, **{k: 'nan' for k in r if k.startswith('probe_')}})
  res = report.write_report(out)
  md = _md(out)
  assert res['figures']['probe'] == {} and os.listdir(os.path.join(out, 'figures')) == []
  assert 'no class test in summary.json' in _headline(md, 'probe')
  for why in ('no histogram in summary.json', 'no frequency statistics in summary.json',
              'no class test in summary.json', 'no top items in summary.json'):
    assert f'Not shown: {why}' in md
  assert os.path.getsize(res['report_html']) > 1000


def test_probe_training_and_cautions(tmp_path):
  """A probe that hit its step cap and an estimator that agrees with no other are flagged in
  the headline; the probe's curve gets a table line and a figure."""
  out, summary = make_analysis(tmp_path, estimators=('probe', 'ablation'))
  summary['per_estimator']['probe']['training'] = {
      'steps': 3000, 'converged': False, 'heldout_loss': [6.2, 6.3], 'model_heldout_loss': 5.8,
      'n_train_positions': 1000, 'n_heldout_positions': 100,
      'curve': [{'step': 25, 'train': [7.0, 7.1], 'heldout': [6.9, 7.0]},
                {'step': 50, 'train': [6.4, 6.5], 'heldout': [6.2, 6.3]}]}
  summary['agreement']['probe~ablation']['spearman'] = 0.1
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  res = report.write_report(out)
  md = _md(out)
  caution = md[md.index('**Caution.**'):md.index('## How to read')]
  assert '`probe` did not converge' in caution and '(3000 steps)' in caution
  assert '`ablation` agrees weakly with the other estimators (best Spearman 0.10' in caution
  assert '**did not converge** (step cap reached) after 3000 steps' in md
  assert 'tower 0 6.200, tower 1 6.300; the model itself 5.800' in md
  assert res['figures']['probe']['training'] == 'figures/probe_training.png'


_OLD_INLINE = re.compile(r'\\(.)|\*\*|`')


def _old_inline_html(text):
  """The hand-written inline Markdown renderer report.html used before markdown-it-py."""
  out, bold, code, pos = [], False, False, 0
  for m in _OLD_INLINE.finditer(text):
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
  return ''.join(out + ['</code>'] * code + ['</b>'] * bold)


def _old_block_html(b):
  """The hand-written block renderer of the same version."""
  if b[0] == 'h':
    return f'<h{b[1]}>{_old_inline_html(b[2])}</h{b[1]}>'
  if b[0] == 'p':
    return f'<p>{_old_inline_html(b[1])}</p>'
  if b[0] == 'ul':
    return '<ul>' + ''.join(f'<li>{_old_inline_html(t)}</li>' for t in b[1]) + '</ul>'
  head = ''.join(f'<th>{_old_inline_html(h)}</th>' for h in b[1])
  rows = ''.join('<tr>' + ''.join(f'<td>{_old_inline_html(c)}</td>' for c in r) + '</tr>'
                 for r in b[2])
  return f'<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


class _Events(html_parser.HTMLParser):
  """An HTML fragment as the tags and text a browser shows (<b> and <strong> alike)."""

  def __init__(self, fragment):
    super().__init__()
    self.events = []
    self.feed(fragment)
    self.close()

  def handle_starttag(self, tag, attrs):
    self.events.append(('<', 'strong' if tag == 'b' else tag, sorted(attrs)))

  def handle_endtag(self, tag):
    self.events.append(('>', 'strong' if tag == 'b' else tag))

  def handle_data(self, data):
    if data.strip():
      self.events.append(('text', data))


@pytest.mark.parametrize('variant', [
    dict(planted=True), dict(n_towers=3, estimators=('probe', 'gate'), planted=True),
    dict(estimators=('probe',), struct=False, token_view=False), dict(n_towers=1)])
def test_markdown_it_renders_every_block_as_the_old_renderer_did(tmp_path, monkeypatch, variant):
  """report.html through markdown-it-py shows the same tags and text as the hand-written
  renderer it replaced, block by block, on the report of each analysis fixture."""
  n_towers = variant.pop('n_towers', 2)
  out, summary = make_analysis(tmp_path, n_towers=max(n_towers, 2), **variant)
  if n_towers == 1:
    summary['n_towers'] = 1
    with open(os.path.join(out, 'summary.json'), 'w') as f:
      json.dump(summary, f)
  seen, to_html = [], render.to_html
  monkeypatch.setattr(render, 'to_html',
                      lambda blocks, d: seen.extend(blocks) or to_html(blocks, d))
  report.write_report(out)
  kinds = {b[0] for b in seen}
  assert {'h', 'p', 'ul', 'table'} <= kinds
  odd = ['&amp;', ODD_PIECE, '*x*', '_y_', '\\', '`', '# h', '[a](b)', '<!-- c -->', '\u2581-']
  seen += [fmt.TABLE(['piece', 'x'], [[fmt.md_escape(fmt.show_piece(p)), '1'] for p in odd]),
           fmt.P('pieces ' + ', '.join(fmt.md_escape(p) for p in odd))]
  for b in seen:
    if b[0] in ('h', 'p', 'ul', 'table'):
      assert _Events(render.block_html(b)).events == _Events(_old_block_html(b)).events, b
    elif b[0] == 'fig':
      assert _Events(render.inline_html(b[2])).events == _Events(_old_inline_html(b[2])).events


def test_class_clause_shows_where_each_class_leans():
  """One tower better for everything: both classes lean to tower 0, so no split, and the
  sentence says so (each lean from its own median, not from the direction tested)."""
  from twotower_jax.report import headline  # pylint: disable=import-outside-toplevel
  block = class_block(0.3, [0.2, 0.4], 1.0)
  block['test']['lean_positive'].update(median=0.05, p_positive=0.3)
  block['test']['lean_negative'].update(median=0.6, p_positive=1e-5)
  text = headline.class_clause(block, {'p': 1.0, 'p_adjusted': 1.0, 'significant': False},
                               'function words', 'content words', 2)
  assert text.startswith('no class split between function words and content words shown')
  assert 'function words to tower 0 (median 0.050, p = 0.300)' in text
  assert 'content words to tower 0 (median 0.600, p < 0.0001)' in text
