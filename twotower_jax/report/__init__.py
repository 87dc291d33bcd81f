"""The analysis report: report.md, report.html and figures/*.png from DIR/analysis alone.

Reads only the files the analysis writes (through workdir.py; docs/REPORT.md explains
them to a reader), so a report can be rebuilt or restyled without the model:
sections.py builds the content as blocks, render.py renders it twice (Markdown and
self-contained HTML), figures.py draws the PNGs. Missing estimators or sections give
a line saying why.
"""

from __future__ import annotations

import os
from typing import Any

from twotower_jax import errors
from twotower_jax import preference_table
from twotower_jax import workdir as workdir_lib
from twotower_jax.report import figures
from twotower_jax.report import lens as lens_report
from twotower_jax.report import render
from twotower_jax.report import sections
from twotower_jax.report.trajectory import write_over_training  # noqa: F401  (analyze --steps)


class ReportError(errors.UserError):
  """Analysis files missing; the message says which and how to fix it."""


def write_report(analysis_dir: str) -> dict[str, Any]:
  """Writes report.md, report.html and figures/*.png under analysis_dir; returns their paths."""
  pref_path = os.path.join(analysis_dir, workdir_lib.PREFERENCE_CSV)
  sum_path = os.path.join(analysis_dir, workdir_lib.SUMMARY_JSON)
  for path in (pref_path, sum_path):
    if not os.path.exists(path):
      raise ReportError(f'{path} is missing; run `python -m twotower_jax.analyze '
                        '--workdir=DIR` first (it writes DIR/analysis/)')
  summary = workdir_lib.read_json(sum_path)
  prefs = preference_table.read_preferences(pref_path)
  token_view = workdir_lib.read_optional_json(os.path.join(analysis_dir,
                                                           workdir_lib.TOKEN_VIEW_JSON))
  struct = workdir_lib.read_optional_json(os.path.join(analysis_dir, workdir_lib.STRUCT_JSON))
  if struct is None:
    struct = summary.get('structural_probe')
  lens = workdir_lib.read_optional_json(os.path.join(analysis_dir, workdir_lib.TUNED_LENS_JSON))
  figs = figures.make_figures(analysis_dir, summary, prefs, struct)
  if lens:
    figs['_lens'] = lens_report.make_figures(analysis_dir, lens, summary, prefs)
  blocks = sections.build_blocks(summary, prefs, token_view, struct, figs, lens)
  md_path = os.path.join(analysis_dir, workdir_lib.REPORT_MD)
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(render.to_markdown(blocks))
  html_path = os.path.join(analysis_dir, workdir_lib.REPORT_HTML)
  with open(html_path, 'w', encoding='utf-8') as f:
    f.write(render.to_html(blocks, analysis_dir))
  return {'report_md': md_path, 'report_html': html_path, 'figures': figs}
