"""The embedding-alignment report: alignment.md and its two figures, from alignment.json.

alignment.json is written by `python -m twotower_jax.align` (analysis/token_tables.py):
the pairs of token matrices with each measure and its bootstrap interval, and each run's
logged gradient norms of the token table. Reads nothing else.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from twotower_jax import workdir as workdir_lib
from twotower_jax.report import figures
from twotower_jax.report import render
from twotower_jax.report.format import FIG, H, P, TABLE, UL, _finite, ci, md_escape, num

ALIGNMENT_JSON = 'alignment.json'
ALIGNMENT_MD = 'alignment.md'
EARLY_SHARE = 0.1  # the gradient ratio's "early" and "late": the first and last 10% of lines


def pair_label(result: dict[str, Any], p: dict[str, Any]) -> str:
  runs = result['runs']
  return (f"{runs[p['run_a']]['label']}: {p['matrix_a']} ~ "
          f"{runs[p['run_b']]['label']}: {p['matrix_b']}")


def grad_norms(series: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, input-side norm, output-side norm) of the token matrices' gradient: the table's
  through the input lookup, and through the output layer for a tied table or of the
  separate output matrix for an untied run (whose table gets no output gradient)."""
  steps = np.asarray(series.get('step') or [], float)
  inp = np.asarray(series.get('embed_grad_norm_input') or [], float)
  out = np.asarray(series.get('embed_grad_norm_output') or [], float)
  matrix = np.asarray(series.get('embed_grad_norm_output_matrix') or [], float)
  if matrix.size == out.size and np.any(np.isfinite(matrix)):
    out = matrix
  return steps, inp, out


def grad_ratio(series: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
  """(steps, output / input gradient norm), NaN where not logged."""
  steps, inp, out = grad_norms(series)
  with np.errstate(invalid='ignore', divide='ignore'):
    return steps, out / inp


def ratio_summary(series: dict[str, list[float]]) -> tuple[float, float]:
  """Mean output / input ratio over the first and the last EARLY_SHARE of logged steps."""
  _, r = grad_ratio(series)
  r = r[np.isfinite(r)]
  if not r.size:
    return float('nan'), float('nan')
  n = max(1, int(round(EARLY_SHARE * r.size)))
  return float(r[:n].mean()), float(r[-n:].mean())


def fig_alignment(out_dir: str, result: dict[str, Any]) -> str | None:
  pairs, measures = result['pairs'], result['measures']
  if not pairs:
    return None
  fig, axes = figures.new_fig(3.0 * len(measures), 0.9 + 0.32 * len(pairs), 1, len(measures))
  y = np.arange(len(pairs))[::-1]
  for m, name in enumerate(measures):
    ax = axes[0, m]
    vals = np.array([p[name]['value'] if _finite(p[name]['value']) else np.nan for p in pairs])
    lo = np.array([p[name]['ci'][0] if _finite(p[name]['ci'][0]) else np.nan for p in pairs])
    hi = np.array([p[name]['ci'][1] if _finite(p[name]['ci'][1]) else np.nan for p in pairs])
    colors = ['#999999' if p['seed_reference'] else figures.TOWER_COLORS[0] for p in pairs]
    ax.barh(y, np.nan_to_num(vals), color=colors)
    ax.errorbar(vals, y, xerr=[np.abs(vals - lo), np.abs(hi - vals)], fmt='none', ecolor='k',
                lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([figures._plain(pair_label(result, p)) if m == 0 else '' for p in pairs],
                       fontsize=6)
    ax.axvline(0, color='grey', lw=0.6)
    invariant = name in result.get('rotation_invariant', [])
    ax.set_title(f"{name}{'' if invariant else ' (not rotation-invariant)'}", fontsize=8)
    ax.set_xlim(min(0.0, float(np.nanmin(lo)) if np.isfinite(lo).any() else 0.0), 1.0)
  return figures.save(fig, out_dir, 'alignment')


def fig_gradients(out_dir: str, result: dict[str, Any]) -> str | None:
  runs = [r for r in result['runs'] if (r.get('grad_norms') or {}).get('step')]
  if not runs:
    return None
  fig, axes = figures.new_fig(9, 3.3, 1, 2)
  for i, r in enumerate(runs):
    color = figures.TOWER_COLORS[i % len(figures.TOWER_COLORS)]
    steps, inp, out = grad_norms(r['grad_norms'])
    axes[0, 0].plot(steps, inp, '-', color=color, lw=1, label=f"{r['label']}: input")
    axes[0, 0].plot(steps, out, '--', color=color, lw=1, label=f"{r['label']}: output")
    with np.errstate(invalid='ignore', divide='ignore'):
      axes[0, 1].plot(steps, out / inp, '-', color=color, lw=1, label=r['label'])
  axes[0, 0].set_yscale('log')
  axes[0, 0].set_title('token-table gradient norm (solid: input, dashed: output)', fontsize=8)
  axes[0, 1].axhline(1.0, color='grey', lw=0.6, ls=':')
  axes[0, 1].set_yscale('log')
  axes[0, 1].set_title('output / input gradient norm', fontsize=8)
  for ax in axes[0]:
    ax.set_xlabel('training step', fontsize=8)
    ax.legend(fontsize=5)
  return figures.save(fig, out_dir, 'gradient_dominance')


def write(out_dir: str, result: dict[str, Any]) -> str:
  """Writes alignment.json, alignment.md and figures/ into out_dir; returns the .md path."""
  os.makedirs(os.path.join(out_dir, workdir_lib.FIG_DIR), exist_ok=True)
  workdir_lib.write_json(os.path.join(out_dir, ALIGNMENT_JSON), result, indent=1)
  measures = result['measures']
  blocks = [H(1, 'Token-matrix alignment between runs'),
            P(f"{result['n_tokens']} tokens: the non-special pieces seen at least "
              f"{result['min_count']} times in every run's training windows. Each measure is a "
              'similarity (1 = the same matrix up to what it ignores, about 0 = unrelated), '
              f"with a 95% bootstrap interval over tokens ({result['n_boot']} resamples). "
              'Rotation-invariant: ' + ', '.join(result.get('rotation_invariant', [])) +
              f"; knn uses k = {result['k']}. Grey bars / *reference* rows: the same matrix of "
              'two runs that differ only in train.seed, the level equally trained matrices '
              'reach. docs/COMPANIONS.md explains each measure and matrix.'),
            UL([f"run {i}: {md_escape(r['label'])}, step {r['step']}, `{md_escape(r['workdir'])}`"
                f" ({', '.join(f'{n} {s[0]}x{s[1]}' for n, s in r['matrices'].items())})"
                for i, r in enumerate(result['runs'])])]
  fig = fig_alignment(out_dir, result)
  if fig:
    blocks.append(FIG(fig, 'Each pair of token matrices under each measure, 95% interval.'))
  blocks.append(TABLE(['pair', 'reference'] + measures,
                      [[md_escape(pair_label(result, p)), 'yes' if p['seed_reference'] else '']
                       + [f"{num(p[m]['value'])} {ci(p[m]['ci'])}" for m in measures]
                       for p in result['pairs']]))
  blocks.append(H(2, 'Gradient dominance over training'))
  fig = fig_gradients(out_dir, result)
  if fig:
    blocks.append(FIG(fig, 'Norm of the token table\'s gradient through the input lookup and '
                      'through the output layer (an untied run: its output matrix\'s), logged '
                      'every train.log_every steps.'))
  rows = []
  for r in result['runs']:
    early, late = ratio_summary(r.get('grad_norms') or {})
    rows.append([md_escape(r['label']), num(early), num(late)])
  blocks.append(P(f'Mean output / input ratio over the first and last {int(EARLY_SHARE * 100)}% '
                  'of the logged steps (above 1: the output side dominates).'))
  blocks.append(TABLE(['run', 'early ratio', 'late ratio'], rows))
  path = os.path.join(out_dir, ALIGNMENT_MD)
  workdir_lib.write_text(path, render.to_markdown(blocks))
  return path
