"""Rendering the report's blocks: GitHub-flavoured Markdown and one self-contained HTML page.

The HTML page is the Markdown rendered by markdown-it-py (CommonMark with GitHub's tables,
raw HTML off), so report.html shows what report.md shows on GitHub; figures become base64
images and the token view coloured spans, which Markdown cannot express.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from typing import Any, Sequence

import markdown_it

from twotower_jax.report.format import SPACE_PIECE, _finite

MARK_THRESHOLD = 0.25  # |lean| below this gets no tower marker in the Markdown token view


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

# CommonMark + GFM tables; 'html': False escapes any raw HTML in a piece or a name.
_MARKDOWN = markdown_it.MarkdownIt('commonmark', {'html': False}).enable('table')
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
  """One line of the report's Markdown (**bold**, `code`, backslash escapes) as HTML."""
  return _MARKDOWN.renderInline(text)


def block_html(block: tuple) -> str:
  """A heading, paragraph, list or table block: its Markdown (to_markdown) as HTML."""
  return _MARKDOWN.render(to_markdown([block])).strip()


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


def to_html(blocks: Sequence[tuple], analysis_dir: str,
            title: str = 'Tower preference report') -> str:
  """Renders the blocks as one self-contained HTML page (figures as base64 data URIs)."""
  body = []
  for b in blocks:
    kind = b[0]
    if kind in ('h', 'p', 'ul', 'table'):
      body.append(block_html(b))
    elif kind == 'fig':
      with open(os.path.join(analysis_dir, b[1]), 'rb') as f:
        data = base64.b64encode(f.read()).decode('ascii')
      cap = inline_html(b[2])
      body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[1])}">'
                  f'<figcaption>{cap}</figcaption></figure>')
    elif kind == 'tokens':
      body.append(tokens_html(b[1]))
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<title>{html.escape(title)}</title>'
          f'<style>{CSS}</style></head><body>\n' + '\n'.join(body) + '\n</body></html>\n')
