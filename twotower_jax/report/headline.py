"""The report's headline and its table of tests: each claim with the test behind it.

Every sentence says what its test shows (docs/ANALYSIS_STATS.md): "some items prefer a
tower" comes from the shuffled-tower test; a class split only from the class test (an
association within strata of frequency and item loss, and the two classes leaning to
different towers), judged at alpha for the primary test and after Holm's adjustment for
every other one (summary.json `tests`).
"""

from __future__ import annotations

from typing import Any

from twotower_jax.report.format import H, P, TABLE, UL, _finite, ci, count, md_escape, num

SOURCES = {'treebank': 'gold UPOS from a CoNLL-U treebank',
           'word_list': 'the word-class list analysis.word_classes',
           'function_words': 'the built-in English function-word list'}
PAIRS = {'class_enrichment': ('class', 'function words', 'content words'),
         'punct': ('punct', 'punctuation', 'content words'),
         'planted': ('planted', 'planted syntax items', 'planted topic items')}


def p_text(p: Any, floor: Any = None) -> str:
  """'p = 0.031' (four decimals below 0.01), 'p < 0.0001', 'p ≤ 0.001' at `floor` (the
  smallest p a test with that many draws can give), 'p = n/a'."""
  if not _finite(p):
    return 'p = n/a'
  p = float(p)
  text = f'{p:.2g}' if p < 0.01 else f'{p:.3f}'
  if _finite(floor) and p <= float(floor) * (1 + 1e-9):
    return f'p ≤ {text}'
  if p < 1e-4:
    return 'p < 0.0001'
  return f'p = {text}'


def tests_by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
  return {t['name']: t for t in ((summary.get('tests') or {}).get('family') or [])}


def judged(row: dict[str, Any] | None, floor: Any = None) -> str:
  """'p = 0.004 (the primary test)' or 'p = 0.004, Holm-adjusted p = 0.03'."""
  if not row:
    return 'not in the tested family'
  if row.get('primary'):
    return f"{p_text(row.get('p'), floor)} (the primary test)"
  return f"{p_text(row.get('p'), floor)}, Holm-adjusted {p_text(row.get('p_adjusted'))}"


def _lean(test: dict[str, Any], which: str, name: str) -> str:
  """'function words to tower 0 (median 0.012, p = 0.03)': where one class leans (the sign of
  its median preference) and the one-sided signed-rank p of that lean."""
  lean = test.get(f'lean_{which}') or {}
  median = lean.get('median')
  if not _finite(median) or float(median) == 0:
    return f"{name} to neither tower (median {num(median, 3)})"
  toward = 0 if float(median) > 0 else 1
  p = lean.get('p_positive' if toward == 0 else 'p_negative')
  return f"{name} to tower {toward} (median {num(median, 3)}, {p_text(p)})"


def class_clause(block: dict[str, Any] | None, row: dict[str, Any] | None, pos: str, neg: str,
                 n_towers: int) -> str:
  """One class test in a sentence: the verdict, then every number it rests on."""
  if not block or 'test' not in block:
    return (f'{pos} vs {neg}: no class test in summary.json (written before it existed; rerun '
            'the analysis)')
  test = block['test']
  assoc = test.get('association') or {}
  if not _finite(block.get('p')):
    return (f'{pos} vs {neg}: not testable ({count(block.get("n_positive"))} vs '
            f'{count(block.get("n_negative"))} items; a stratum must hold both classes)')
  significant = bool(row and row.get('significant'))
  stat = (f"adjusted AUC {num(block.get('auc', assoc.get('auc')), 3)} "
          f"{ci(block.get('ci', assoc.get('ci')), 3)}, plain "
          f"{num(block.get('auc_unadjusted'), 3)}")
  if n_towers > 2:
    what = (f'{pos} have sharper tower preferences than {neg}' if significant and
            test.get('direction') == 'positive_sharper' else
            f'{neg} have sharper tower preferences than {pos}' if significant else
            f'no difference in sharpness between {pos} and {neg} shown')
    return f'{what} ({stat}; {judged(row)})'
  to0 = test.get('direction') == 'positive->0'
  a, b = (0, 1) if to0 else (1, 0)
  legs = f"{_lean(test, 'positive', pos)}, {_lean(test, 'negative', neg)}"
  if significant:
    what = f'**class split: {pos} lean to tower {a}, {neg} to tower {b}**'
  else:
    what = f'no class split between {pos} and {neg} shown'
  return f'{what} ({stat}; leans: {legs}; {judged(row)})'


def prefer_clause(ps: dict[str, Any], row: dict[str, Any] | None) -> str:
  """The shuffled-tower test: do items prefer a tower at all?"""
  pr = ps.get('prefer') or {}
  null = pr.get('null') or {}
  if not _finite(pr.get('statistic')) or not _finite(null.get('null_mean')):
    return 'whether items prefer a tower: not tested'
  ratio = (float(pr['statistic']) / float(null['null_mean'])
           if float(null['null_mean']) > 0 else float('nan'))
  verdict = ('some items prefer a tower' if row and row.get('significant') else
             'no tower preference beyond sampling noise shown')
  floor = 1.0 / (float(null['n_null']) + 1) if _finite(null.get('n_null')) else None
  return (f"{verdict}: mean squared preference {num(pr['statistic'], 4)}, {num(ratio, 1)}x that "
          f'with the towers shuffled at every occurrence ({judged(row, floor)})')


def estimator_item(est: str, ps: dict[str, Any], rows: dict[str, Any], n_towers: int) -> str:
  parts = [prefer_clause(ps, rows.get(f'{est}/prefer'))]
  for key, (test, pos, neg) in PAIRS.items():
    if key in ps and (key != 'planted' or ps.get(key)):
      parts.append(class_clause(ps.get(key), rows.get(f'{est}/{test}'), pos, neg, n_towers))
  return f'`{est}`: ' + '; '.join(p[0].lower() + p[1:] if p[:2] != '**' else p
                                  for p in parts) + '.'


def sensitivity(summary: dict[str, Any], ests: list[str], rows: dict[str, Any]) -> str | None:
  """With a treebank: the class test under the built-in list too, and whether they agree."""
  lines = []
  for est in ests:
    ps = (summary.get('per_estimator') or {}).get(est) or {}
    for source, block in (ps.get('class_sensitivity') or {}).items():
      main = rows.get(f'{est}/class') or {}
      alt = rows.get(f'{est}/class@{source}') or {}
      agree = bool(main.get('significant')) == bool(alt.get('significant'))
      lines.append(f"`{est}` with {SOURCES.get(source, source)}: adjusted AUC "
                   f"{num(block.get('auc'), 3)} {ci(block.get('ci'), 3)}, {judged(alt)}: "
                   f"{'the same verdict' if agree else '**a different verdict**'} as with "
                   f"{SOURCES.get(summary.get('word_class_source'), 'the main source')}")
  return ('Word-class source: ' + '; '.join(lines) + '.') if lines else None


def primary_line(summary: dict[str, Any], rows: dict[str, Any]) -> str:
  tests = summary.get('tests') or {}
  name = tests.get('primary')
  if not name:
    return ('This analysis was written before the tests had a primary test and Holm '
            'adjustment; rerun `python -m twotower_jax.analyze` to get them.')
  row = rows.get(name)
  alpha = num(tests.get('alpha'), 2)
  if not row or not _finite(row.get('p')):
    return (f"Primary test `{md_escape(name)}` (fixed in `analysis.primary` before the data "
            f"was seen): {md_escape(tests.get('primary_note') or 'not available')}.")
  return (f"Primary test `{md_escape(name)}` (fixed in `analysis.primary` before the data was "
          f"seen; {md_escape(row.get('what', ''))}): {p_text(row['p'])} at alpha {alpha}: "
          f"{'**rejected**' if row['significant'] else 'not rejected'}. Every other p below is "
          f"also given Holm-adjusted over the {len(rows) - 1} other tests of this report.")


def coverage(summary: dict[str, Any], ps: dict[str, Any]) -> str:
  docs = ps.get('n_documents')
  source = SOURCES.get(summary.get('word_class_source'), 'n/a')
  return (f"{count(ps.get('n_items'))} vocabulary items seen at least "
          f"{count(summary.get('min_count'))} times, among {count(summary.get('n_positions'))} "
          f"scored positions in {count(summary.get('n_eval_windows'))} held-out windows"
          + (f" (each scored {count(summary['mask_draws'])} times with new masks)"
             if (summary.get('mask_draws') or 1) > 1 else '')
          + (f' from {count(docs)} documents' if _finite(docs) else '') +
          f" (checkpoint step {count(summary.get('step'))}). Word classes: {md_escape(source)}. "
          'Adjusted AUC: of two items of different classes with similar frequency and item '
          'loss, the chance that the first leans more to tower 0, after the part of the '
          'preference that frequency and item loss explain is removed (0.5 = no difference).')


def blocks(summary: dict[str, Any], ests: list[str], n_towers: int) -> list:
  """The headline: coverage, the primary test, one item per estimator, the sensitivity."""
  per_est = summary.get('per_estimator') or {}
  rows = tests_by_name(summary)
  out = [P(coverage(summary, per_est[ests[0]])), P(primary_line(summary, rows)),
         UL([estimator_item(e, per_est[e], rows, n_towers) for e in ests])]
  sens = sensitivity(summary, ests, rows)
  if sens:
    out.append(P(sens))
  return out


def tests_table(summary: dict[str, Any]) -> list:
  """Every test of the report: what a rejection says, p, Holm-adjusted p, verdict."""
  tests = summary.get('tests') or {}
  fam = tests.get('family') or []
  if not fam:
    return []
  return [H(2, 'The tests'),
          P(f"Alpha {num(tests.get('alpha'), 2)}. The primary test is judged on its own p; "
            "every other test on its Holm-adjusted p (over all tests but the primary), so the "
            'chance that any of the claims below is a false positive stays below alpha. The '
            'class tests and the shuffled-tower tests answer different questions: see "How to '
            'read this report".'),
          TABLE(['test', 'a rejection says', 'p', 'Holm-adjusted p', 'rejected'],
                [[md_escape(t['name']) + (' (primary)' if t.get('primary') else ''),
                  md_escape(t.get('what', '')), p_text(t.get('p'))[4:],
                  'primary' if t.get('primary') else p_text(t.get('p_adjusted'))[4:],
                  'yes' if t.get('significant') else 'no'] for t in fam])]
