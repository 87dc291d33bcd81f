"""The report's tuned-lens section, from tuned_lens.json (and preference.csv for the view of
each tower's preferred items): KL and loss per tower and layer, each block's update of the
residual stream, and at which depth the items that lean to a tower become predictable."""

from __future__ import annotations

from typing import Any

import numpy as np

from twotower_jax.report import figures
from twotower_jax.report.format import FIG, H, P, TABLE, WHY, _finite, count, md_escape, num

HALF = 0.5  # an item group is "predictable" from the layer where its excess loss first halves


def _arr(x: Any) -> np.ndarray:
  return np.array(x if x is not None else [], dtype=float)


def preference_estimator(summary: dict[str, Any], prefs: dict[str, Any]) -> str | None:
  """The estimator that decides which tower an item leans to: the primary test's, else the
  first that ran."""
  primary = str((summary.get('tests') or {}).get('primary') or '').partition('/')[0]
  for est in [primary] + list(summary.get('estimators') or []):
    if est and isinstance(prefs.get(f'{est}_pref'), np.ndarray):
      return est
  return None


def item_groups(lens: dict[str, Any], summary: dict[str, Any], prefs: dict[str, Any]
                ) -> tuple[str | None, dict[int, np.ndarray]]:
  """(estimator, {tower j: mask over the lens's items}): items whose preference interval
  lies on tower j's side (two towers: pref > 0 for tower 0, < 0 for tower 1)."""
  est = preference_estimator(summary, prefs)
  items = _arr((lens.get('items') or {}).get('token_id')).astype(int)
  if est is None or not items.size or int(lens.get('n_towers') or 0) != 2:
    return est, {}
  row = {int(t): i for i, t in enumerate(prefs['token_id']) if _finite(t)}
  idx = np.array([row.get(int(t), -1) for t in items])
  lo = np.where(idx >= 0, prefs[f'{est}_pref_lo'][np.maximum(idx, 0)], np.nan)
  hi = np.where(idx >= 0, prefs[f'{est}_pref_hi'][np.maximum(idx, 0)], np.nan)
  return est, {0: lo > 0, 1: hi < 0}


def group_excess(lens: dict[str, Any], mask: np.ndarray) -> np.ndarray:
  """excess_NxS: mean over the group's items of (lens loss - the model's loss on the item)."""
  it = lens.get('items') or {}
  loss_NxSxI, model_I = _arr(it.get('loss')), _arr(it.get('model_loss'))
  if not mask.any() or loss_NxSxI.ndim != 3:
    return np.full(loss_NxSxI.shape[:2] if loss_NxSxI.ndim == 3 else (0, 0), np.nan)
  return np.nanmean(loss_NxSxI[:, :, mask] - model_I[mask], axis=2)


def predictable_depth(excess_S: np.ndarray, layers: list[str]) -> str:
  """The first layer whose excess loss is at most HALF of the first layer's."""
  if not excess_S.size or not np.isfinite(excess_S[0]) or excess_S[0] <= 0:
    return 'n/a'
  hit = np.flatnonzero(excess_S <= HALF * excess_S[0])
  return layers[int(hit[0])] if hit.size else 'n/a'


def make_figures(analysis_dir: str, lens: dict[str, Any], summary: dict[str, Any],
                 prefs: dict[str, Any]) -> dict[str, str]:
  layers = list(lens.get('layers') or [])
  kl, loss = _arr(lens.get('kl')), _arr(lens.get('loss'))
  if kl.ndim != 2 or not layers:
    return {}
  contribution = _arr(lens.get('contribution'))
  fig, axes = figures.new_fig(11, 3.2, 1, 3)
  x = np.arange(len(layers))
  for k in range(kl.shape[0]):
    c = figures.TOWER_COLORS[k % len(figures.TOWER_COLORS)]
    axes[0, 0].plot(x, kl[k], '-o', ms=3, color=c, label=f'tower {k}')
    axes[0, 1].plot(x, loss[k], '-o', ms=3, color=c, label=f'tower {k}')
    if contribution.ndim == 2:
      axes[0, 2].plot(x, contribution[k], '-o', ms=3, color=c, label=f'tower {k}')
  if _finite(lens.get('model_loss')):
    axes[0, 1].axhline(lens['model_loss'], color='k', ls='--', lw=0.8, label='the model')
  axes[0, 2].set_yscale('log')  # the first block's update dwarfs the rest (small embeddings)
  for ax, title in zip(axes[0], ('KL(final || lens), nats', 'lens loss on held-out targets',
                                 '|update| / |stream| of each block (log)')):
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=45, ha='right', fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6)
  out = {'lens': figures.save(fig, analysis_dir, 'tuned_lens')}
  est, groups = item_groups(lens, summary, prefs)
  if groups and any(m.any() for m in groups.values()):
    fig, axes = figures.new_fig(8, 3.2, 1, kl.shape[0])
    for k in range(kl.shape[0]):
      ax = axes[0, k]
      for j, mask in groups.items():
        if mask.any():
          ax.plot(x, group_excess(lens, mask)[k], '-o', ms=3,
                  color=figures.TOWER_COLORS[j % len(figures.TOWER_COLORS)],
                  label=f'items leaning to tower {j} ({int(mask.sum())})')
      ax.axhline(0, color='grey', lw=0.6)
      ax.set_xticks(x)
      ax.set_xticklabels(layers, rotation=45, ha='right', fontsize=7)
      ax.set_title(f'tower {k} read at each layer ({est})', fontsize=8)
      ax.set_ylabel('lens loss - model loss (nats)', fontsize=7)
      ax.legend(fontsize=6)
    out['depth'] = figures.save(fig, analysis_dir, 'tuned_lens_depth')
  return out


def blocks(lens: dict[str, Any] | None, summary: dict[str, Any], prefs: dict[str, Any],
           figs: dict[str, str]) -> list:
  out = [H(2, 'Tuned lens (each tower read at each layer)')]
  if not lens:
    return out + [WHY('no tuned lens: analysis.lens was not set (it adds minutes)')]
  layers = list(lens.get('layers') or [])
  tr = lens.get('training') or {}
  out.append(P(
      'For each tower and layer an affine map, started at the least-squares map onto the '
      "tower's last state, translates the layer's state into it; the tower's final norm, the "
      'gate and the output layer then read it, with the other towers at their final states. '
      'Trained to match the model\'s final distribution on '
      f"{count(tr.get('n_train_positions'))} cached training positions "
      f"({'converged' if tr.get('converged') else '**did not converge**'} after "
      f"{count(tr.get('steps'))} steps). KL and loss below are on the "
      f"{count(lens.get('n_positions'))} scored held-out positions; the model's own loss "
      f"there is {num(lens.get('model_loss'))}. On the last layer the lens is the model "
      'itself. The update of a block is the norm of what it adds to the residual stream '
      'relative to the stream it reads.'))
  if 'lens' in figs:
    out.append(FIG(figs['lens'], 'Per tower and layer: KL to the final distribution, the '
                   'lens\'s loss and the relative size of each block\'s update.'))
  kl, loss, contrib = _arr(lens.get('kl')), _arr(lens.get('loss')), _arr(lens.get('contribution'))
  ident, start = _arr(tr.get('identity_heldout_kl')), _arr(tr.get('least_squares_heldout_kl'))
  tuned = _arr(tr.get('heldout_kl'))
  rows = []
  for k in range(kl.shape[0] if kl.ndim == 2 else 0):
    for s, name in enumerate(layers):
      cell = lambda a: num(a[k, s]) if a.ndim == 2 and a.shape[1] > s else 'n/a'
      rows.append([str(k), md_escape(name), cell(kl), cell(loss), cell(ident), cell(start),
                   cell(tuned), cell(contrib)])
  out.append(P('KL and loss: the trained lens on the scored positions. Held-out KL (on the '
               "lens's own held-out training windows): the identity map (the \"logit lens\"), "
               'the least-squares start and the trained lens.'))
  out.append(TABLE(['tower', 'layer', 'KL', 'loss', 'held-out KL: identity', 'least squares',
                    'tuned', 'update / stream'], rows))
  est, groups = item_groups(lens, summary, prefs)
  out.append(H(3, 'At which depth each tower\'s preferred items become predictable'))
  if not groups:
    return out + [WHY('needs two towers, an estimator\'s preferences and items with count >= '
                      'min_count')]
  out.append(P(f'Items leaning to a tower: those whose `{md_escape(est or "")}` preference '
               'interval excludes 0. For each group and each tower read at each layer (the '
               'other tower complete), the lens\'s mean loss on the group\'s items minus the '
               'model\'s: the loss still missing when the tower stops at that layer. A '
               'group becomes predictable from a tower where that excess first falls to half '
               'its value at the first layer.'))
  if 'depth' in figs:
    out.append(FIG(figs['depth'], 'Excess loss of each group of items, per tower and layer.'))
  rows = []
  for k in range(kl.shape[0] if kl.ndim == 2 else 0):
    for j, mask in groups.items():
      excess = group_excess(lens, mask)
      ex_k = excess[k] if excess.ndim == 2 and excess.shape[0] > k else np.array([])
      rows.append([str(k), f'tower {j}', count(int(mask.sum())),
                   num(ex_k[0]) if ex_k.size else 'n/a', num(ex_k[-1]) if ex_k.size else 'n/a',
                   md_escape(predictable_depth(ex_k, layers))])
  out.append(TABLE(['tower read', 'items leaning to', 'items', 'excess at first layer',
                    'excess at last layer', 'predictable from'], rows))
  return out
