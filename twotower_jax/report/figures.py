"""The report's figures (matplotlib, Agg, no pyplot state), written to DIR/analysis/figures/."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.report.format import (_finite, _pref_col, _scored, _tower_keys, ci, count,
                                        leaning_items, num, show_piece)

DPI = 110
TOWER_COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b')


def new_fig(w: float, h: float, nrows: int = 1, ncols: int = 1):
  """A pyplot-free Agg figure (no global state, safe in any process)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(w, h), dpi=DPI)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def save(fig, analysis_dir: str, name: str) -> str:
  """Saves under figures/ and returns the path relative to analysis_dir."""
  rel = f'{workdir_lib.FIG_DIR}/{name}.png'
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
  fig, ax = new_fig(6, 3.4)
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
  return save(fig, d, f'{est}_histogram')


def _class_masks(prefs, mask):
  wc = np.array(prefs.get('word_class') or [''] * len(mask))
  return mask & (wc == 'closed'), mask & (wc == 'open'), mask & (wc != 'closed') & (wc != 'open')


N_LABELLED = 4  # the most extreme items per side get their piece written next to them


def _label_extremes(ax, x, y, names, ok):
  """Writes the pieces of the N_LABELLED highest and lowest y among `ok` next to them."""
  idx = np.flatnonzero(ok)
  if not idx.size:
    return
  order = idx[np.argsort(y[idx], kind='stable')]
  for i in list(order[:N_LABELLED]) + list(order[-N_LABELLED:]):
    ax.annotate(_plain(show_piece(names[i])), (x[i], y[i]), fontsize=6, alpha=0.85,
                xytext=(3, 2), textcoords='offset points')


def fig_training(d, est, ps):
  """Held-out loss of each probe head against its training step."""
  curve = (ps.get('training') or {}).get('curve') or []
  if not curve:
    return None
  fig, ax = new_fig(5, 3)
  ax = ax[0, 0]
  steps = [c['step'] for c in curve]
  for k in range(len(curve[0]['heldout'])):
    ax.plot(steps, [c['heldout'][k] for c in curve], '-o', ms=3,
            color=TOWER_COLORS[k % len(TOWER_COLORS)], label=f'tower {k} held out')
    ax.plot(steps, [c['train'][k] for c in curve], ':', color=TOWER_COLORS[k % len(TOWER_COLORS)],
            label=f'tower {k} training')
  model = (ps.get('training') or {}).get('model_heldout_loss')
  if _finite(model):
    ax.axhline(model, color='black', lw=0.8, ls='--', label='the model')
  ax.set_xlabel('probe step')
  ax.set_ylabel('cross-entropy (nats)')
  ax.set_title(f'{est}: probe heads', fontsize=9)
  ax.legend(fontsize=7)
  return save(fig, d, f'{est}_training')


def fig_frequency(d, est, ps, prefs, scored):
  pref = _pref_col(prefs, est)
  if pref is None:
    return None
  ok = scored & np.isfinite(pref) & (prefs['count'] > 0)
  if not ok.any():
    return None
  fig, ax = new_fig(6, 3.6)
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
  _label_extremes(ax, prefs['count'], pref, prefs['piece'], ok)
  ax.set_xscale('log')
  ax.axhline(0, color='grey', lw=0.8, ls=':')
  fr = ps.get('frequency') or {}
  ax.set_title(f"{est}: preference vs frequency (Spearman {num(fr.get('spearman_logfreq'), 2)} "
               f"{ci(fr.get('ci'), 2)})", fontsize=9)
  ax.set_xlabel('count (occurrences in the scored positions, log scale)')
  ax.set_ylabel('preference')
  ax.legend(fontsize=7)
  return save(fig, d, f'{est}_frequency')


def fig_classes(d, est, ps, prefs, scored):
  pref = _pref_col(prefs, est)
  ce = ps.get('class_enrichment') or {}
  if pref is None:
    return None
  ok = scored & np.isfinite(pref)
  closed, opn, _ = _class_masks(prefs, ok)
  if not (closed.any() or opn.any()):
    return None
  fig, ax = new_fig(6, 3.4)
  ax = ax[0, 0]
  vals = pref[closed | opn]
  edges = np.linspace(vals.min(), vals.max() + 1e-9, 26)
  for m, c, lab in ((closed, '#9b59b6', 'function words'), (opn, '#2ca02c', 'content words')):
    if m.any():
      ax.hist(pref[m], bins=edges, density=True, histtype='stepfilled', alpha=0.45, color=c,
              label=f'{lab} (n={int(m.sum())}, mean {num(pref[m].mean(), 2)})')
  ax.axvline(0, color='grey', lw=0.8, ls=':')
  ax.set_title(f"{est}: function vs content words, adjusted AUC {num(ce.get('auc'), 2)} "
               f"{ci(ce.get('ci'), 2)}", fontsize=9)
  ax.set_xlabel('preference')
  ax.set_ylabel('density')
  ax.legend(fontsize=7)
  return save(fig, d, f'{est}_classes')


def fig_top(d, est, ps, n_towers=2):
  top = ps.get('top_items') or {}
  keys = [k for k in _tower_keys(top) if leaning_items(top, k, n_towers)]
  if not keys:
    return None
  n = max(len(leaning_items(top, k, n_towers)) for k in keys)
  fig, axes = new_fig(3.2 * len(keys), 0.6 + 0.2 * n, 1, len(keys))
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
  return save(fig, d, f'{est}_top_items')


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
  fig, ax = new_fig(6, 3.2)
  ax = ax[0, 0]
  vals = pref[ok & (pc != '')]
  edges = np.linspace(vals.min(), vals.max() + 1e-9, 26)
  for i, lab in enumerate(labels):
    m = ok & (pc == lab)
    ax.hist(pref[m], bins=edges, histtype='stepfilled', alpha=0.5,
            color=TOWER_COLORS[(i + 2) % len(TOWER_COLORS)],
            label=_plain(f'{lab} (n={int(m.sum())})'))
  pl = ps['planted']
  ax.set_title(f"{est}: planted classes, adjusted AUC {num(pl.get('auc'), 2)} "
               f"{ci(pl.get('ci'), 2)}", fontsize=9)
  ax.set_xlabel('preference')
  ax.set_ylabel('items')
  ax.legend(fontsize=7)
  return save(fig, d, f'{est}_planted')


def _agreement_of(agr, a, b):
  return agr.get(f'{a}~{b}') or agr.get(f'{b}~{a}') or {}


def fig_agreement(d, ests, summary, prefs, scored):
  cols = [(e, _pref_col(prefs, e)) for e in ests]
  cols = [(e, c) for e, c in cols if c is not None]
  if len(cols) < 2:
    return None
  pairs = [(i, j) for i in range(len(cols)) for j in range(i + 1, len(cols))]
  fig, axes = new_fig(3.2 * len(pairs), 3.2, 1, len(pairs))
  agr = summary.get('agreement') or {}
  for p, (i, j) in enumerate(pairs):
    (ea, a), (eb, b) = cols[i], cols[j]
    ok = scored & np.isfinite(a) & np.isfinite(b)
    ax = axes[0, p]
    ax.scatter(a[ok], b[ok], s=6, alpha=0.6, lw=0, color='#555555')
    _label_extremes(ax, a, b, prefs['piece'], ok)
    ag = _agreement_of(agr, ea, eb)
    ax.axhline(0, color='grey', lw=0.6, ls=':')
    ax.axvline(0, color='grey', lw=0.6, ls=':')
    ax.set_title(f"{ea} vs {eb}\nSpearman {num(ag.get('spearman'), 2)} {ci(ag.get('ci'), 2)}",
                 fontsize=8)
    ax.set_xlabel(f'{ea} preference', fontsize=8)
    ax.set_ylabel(f'{eb} preference', fontsize=8)
  return save(fig, d, 'agreement')


def fig_structural(d, sp):
  uuas, dspr, layers = sp.get('uuas') or [], sp.get('dspr') or [], sp.get('layers') or []
  if not uuas or not layers:
    return None
  fig, axes = new_fig(8, 3.2, 1, 2)
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
  return save(fig, d, 'structural_probe')


def make_figures(analysis_dir, summary, prefs, struct) -> dict[str, dict[str, str]]:
  """Writes figures/*.png; returns {est or '_all': {figure kind: relative path}}."""
  os.makedirs(os.path.join(analysis_dir, workdir_lib.FIG_DIR), exist_ok=True)
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
            'planted': fig_planted(analysis_dir, est, ps, prefs, scored),
            'training': fig_training(analysis_dir, est, ps)}
    figs[est] = {k: v for k, v in made.items() if v}
  made = {'agreement': fig_agreement(analysis_dir, ests, summary, prefs, scored),
          'struct': fig_structural(analysis_dir, struct) if struct else None}
  figs['_all'] = {k: v for k, v in made.items() if v}
  return figs
