"""Offline analysis of a run: which tower predicts each vocabulary item, with statistics.

Reads a workdir (config.json, tokenizer, checkpoints), scores the estimators of
`estimators.py` on the same held-out positions and writes DIR/analysis/:
preference.csv, summary.json, token_view.json (formats: docs/ANALYSIS.md), then
the report when twotower_jax/report.py is present.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Any

import ml_collections
import numpy as np

from twotower_jax import checkpoints
from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import estimators as est_lib
from twotower_jax import report
from twotower_jax import stats
from twotower_jax import tokenizer as tokenizer_lib
from twotower_jax import wordclass

log = logging.getLogger('twotower_jax')

ANALYSIS_DIR = 'analysis'
TOP_K = 20
N_FREQ_BINS = 4


class AnalysisError(errors.UserError):
  """A workdir that cannot be analysed; the message says what to do."""


def load_config(workdir: str, analysis: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """The run's config.json with `analysis` (the command line's analysis.* fields) on top."""
  if not os.path.isdir(workdir):
    raise AnalysisError(f'workdir {workdir} does not exist; pass the --workdir of a training run')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise AnalysisError(f'{path} is missing; --workdir must be a directory written by '
                        'python -m twotower_jax.main')
  config = config_lib.load_json(path)
  if analysis is not None:
    config.analysis = ml_collections.ConfigDict(analysis.to_dict())
  config_lib.validate(config)
  from twotower_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  try:  # the training mesh may not fit this machine: fall back to data parallel
    sharding_lib.make_mesh(config)
  except errors.UserError:
    config.mesh.data, config.mesh.fsdp, config.mesh.tower = -1, 1, 1
    sharding_lib.make_mesh(config)
  return config


def restore(config: ml_collections.ConfigDict, workdir: str):
  """(setup, params, step) of the requested (0 = latest complete) checkpoint."""
  from twotower_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import train_state as state_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoints.directory(workdir)):
    raise AnalysisError(f'{workdir} has no checkpoints; train it first (python -m '
                        'twotower_jax.main) or pass the right --workdir')
  if not os.path.exists(os.path.join(workdir, tokenizer_lib.FILENAME)):
    raise AnalysisError(f'{workdir} has no {tokenizer_lib.FILENAME} next to its checkpoints; '
                        'copy the whole training workdir')
  setup = train_lib.build(config, workdir, train_tokenizer=False)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(setup.model, tx, setup.mesh, sharding_lib.rules(config))
  mngr = checkpoints.manager(workdir, read_only=True)
  step = int(config.analysis.step) or checkpoints.latest_complete_step(mngr)
  if step is None:
    raise AnalysisError(f'{checkpoints.directory(workdir)} holds no complete checkpoint; train '
                        'the run (python -m twotower_jax.main) first')
  if step not in mngr.all_steps():
    raise AnalysisError(f'no checkpoint for step {step} in {checkpoints.directory(workdir)}; '
                        f'choose one of {sorted(mngr.all_steps())} or 0 for the latest')
  state, _ = checkpoints.restore(mngr, step, state_lib.abstract(setup.model, tx, state_sh))
  mngr.close()
  return setup, state.params, step


def estimator_names(config: ml_collections.ConfigDict) -> list[str]:
  """The requested estimators that apply to this model (others skipped with a log line)."""
  names = []
  for name in config_lib.estimator_list(config.analysis.estimators):
    reason = est_lib.ESTIMATORS[name].skip_reason(config)
    if reason:
      log.info('analysis: skipping estimator %s: %s', name, reason)
    else:
      names.append(name)
  return names


# ---------------------------------------------------------------- statistics


def _nan(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else float('nan')


def frequency_stats(pref, count, closed, opened, n_boot, seed) -> dict[str, Any]:
  """Spearman of preference with log count (CI) and results within count quantile bins."""
  logc = np.log(count)
  rho = stats.spearman(pref, logc)
  ci = stats.bootstrap_ci(stats.spearman, (pref, logc), n_boot=n_boot, seed=seed)
  edges = np.unique(np.quantile(count, np.linspace(0, 1, N_FREQ_BINS + 1)))
  bins = []
  for i in range(len(edges) - 1):
    lo, hi = edges[i], edges[i + 1]
    m = (count >= lo) & ((count <= hi) if i == len(edges) - 2 else (count < hi))
    known = m & (closed | opened)
    bins.append({'lo': float(lo), 'hi': float(hi), 'n': int(m.sum()),
                 'mean_pref': _nan(np.mean(pref[m])) if m.any() else float('nan'),
                 'auc_closed': stats.auc(pref[known], closed[known])})
  return {'spearman_logfreq': rho, 'ci': list(ci), 'bins': bins}


def class_stats(pref, closed, opened, source, n_boot, seed) -> dict[str, Any]:
  """AUC of closed-class words ranking toward tower 0 (pref > 0), with a bootstrap CI."""
  known = closed | opened
  s, lab = pref[known], closed[known]
  return {'source': source, 'auc': stats.auc(s, lab),
          'ci': list(stats.bootstrap_ci(stats.auc, (s, lab), n_boot=n_boot, seed=seed)),
          'n_closed': int(closed.sum()), 'n_open': int(opened.sum()),
          'mean_pref_closed': _nan(np.mean(pref[closed])) if closed.any() else float('nan'),
          'mean_pref_open': _nan(np.mean(pref[opened])) if opened.any() else float('nan')}


def top_items(res, pieces, keep, n_towers) -> dict[str, list[dict[str, Any]]]:
  """Per tower the k items that lean to it most (two towers: by sign of the preference)."""
  idx = np.nonzero(keep)[0]
  out = {}
  for k in range(max(n_towers, 2)):
    if n_towers <= 2:
      order = idx[np.argsort(-res['pref'][idx] if k == 0 else res['pref'][idx], kind='stable')]
    else:
      mine = idx[res['best'][idx] == k]
      order = mine[np.argsort(-res['pref'][mine], kind='stable')]
    out[f'tower_{k}'] = [{'piece': pieces[i], 'token_id': int(i), 'count': int(res['count'][i]),
                          'pref': float(res['pref'][i])} for i in order[:TOP_K]]
  return out


def estimator_summary(res, pieces, classes, n_towers, config, planted=None) -> dict[str, Any]:
  """Every statistic of one estimator over the items with count >= min_count."""
  a = config.analysis
  keep = (res['count'] >= a.min_count) & np.isfinite(res['pref'])
  pref, count = res['pref'][keep], res['count'][keep]
  closed, opened = wordclass.class_masks(classes['word_class'])
  closed, opened = closed[keep], opened[keep]
  ctrl = res['control_pref'][keep]
  finite = np.concatenate([pref, ctrl])
  finite = finite[np.isfinite(finite)]
  edges = (np.linspace(finite.min(), finite.max(), 31) if finite.size and finite.min() < finite.max()
           else np.linspace(-1, 1, 31))
  kind = 'split_single_tower' if n_towers == 1 else 'shuffled_labels'
  out = {
      'n_items': int(keep.sum()),
      'bimodality': stats.bimodality(pref),
      'control': {'kind': kind, 'bimodality': stats.bimodality(ctrl)},
      'histogram': {'edges': edges.tolist(), 'counts': np.histogram(pref, edges)[0].tolist(),
                    'control_counts': np.histogram(ctrl[np.isfinite(ctrl)], edges)[0].tolist()},
      'frequency': frequency_stats(pref, count, closed, opened, a.n_boot, a.seed),
      'class_enrichment': class_stats(pref, closed, opened, classes['source'], a.n_boot, a.seed),
      'top_items': top_items(res, pieces, keep, n_towers),
      'seconds': float(res['seconds'] + res['prepare_seconds']),
      'tokens_per_s': float(res['tokens_per_s']),
  }
  if planted is not None:  # (planted module, labels_V): how well pref separates the classes
    module, labels_V = planted
    out['planted'] = module.class_separation(res['pref'], labels_V, res['count'], a.min_count,
                                             a.n_boot, a.seed)
  return out


def agreement(results, min_count, n_boot, seed) -> dict[str, Any]:
  """Spearman between every pair of estimators' preferences (items with enough counts)."""
  names = list(results)
  out = {}
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      ra, rb = results[a], results[b]
      m = (ra['count'] >= min_count) & np.isfinite(ra['pref']) & np.isfinite(rb['pref'])
      x, y = ra['pref'][m], rb['pref'][m]
      out[f'{a}~{b}'] = {'spearman': stats.spearman(x, y), 'n': int(m.sum()),
                         'ci': list(stats.bootstrap_ci(stats.spearman, (x, y), n_boot=n_boot,
                                                       seed=seed))}
  return out


# ---------------------------------------------------------------- files


def write_preference_csv(path, pieces, classes, results, n_towers, planted_V=None) -> None:
  """One row per vocabulary item (contract: docs/ANALYSIS.md)."""
  vocab = len(pieces)
  count = next(iter(results.values()))['count'] if results else np.zeros(vocab)
  header = ['token_id', 'piece', 'count', 'word_class', 'upos']
  cols = []
  for est, res in results.items():
    n = res['mean_NxV'].shape[0]
    for k in range(n):
      header.append(f'{est}_t{k}')
      cols.append(res['mean_NxV'][k])
    header += [f'{est}_pref', f'{est}_pref_lo', f'{est}_pref_hi']
    cols += [res['pref'], res['pref_lo'], res['pref_hi']]
    if n > 2:
      header.append(f'{est}_best')
      cols.append(np.where(res['count'] > 0, res['best'], -1))
    for k in range(n):
      if f'shapley_t{k}' in res:
        header.append(f'{est}_shapley_t{k}')
        cols.append(res[f'shapley_t{k}'])
  if planted_V is not None:
    header.append('planted_class')
    cols.append(planted_V)
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(header)
    for v in range(vocab):
      row = [v, pieces[v], int(count[v]), classes['word_class'][v], classes['upos'][v]]
      for c in cols:
        x = c[v]
        if isinstance(x, (np.integer, int)):
          row.append(int(x))
        else:
          x = float(x)
          row.append('nan' if (not math.isfinite(x) or count[v] == 0) else f'{x:.6g}')
      w.writerow(row)
  os.replace(tmp, path)


def token_view(ctx, results, pieces, sp, config) -> dict[str, Any]:
  """A few held-out passages, each piece coloured by the tower it leans to (+1 = tower 0)."""
  n_pass = int(config.analysis.token_view_passages)
  windows = np.concatenate(ctx.eval_batches)[:n_pass]
  passages = []
  if 'gate' in results:
    est, note = 'gate', 'per-token posterior r_0 - r_1 of the latent gate'
  else:
    est = next(iter(results), None)
    note = (f"each item's {est} preference divided by the largest |preference| among items with "
            'count >= min_count (per item, not per token)')
  if est is None or n_pass == 0:
    return {'estimator': est, 'note': 'no estimator ran', 'passages': []}
  res = results[est]
  keep = (res['count'] >= config.analysis.min_count) & np.isfinite(res['pref'])
  scale = np.max(np.abs(res['pref'][keep])) if keep.any() else 1.0
  for i, window in enumerate(windows):
    targets = window[1:]
    if est == 'gate':
      r, w = est_lib.gate_posteriors(ctx.model, ctx.params, window[None])
      lean = np.where(w[0] > 0, r[0, 0] - r[1, 0], np.nan)
    else:
      lean = np.clip(res['pref'][targets] / max(scale, 1e-12), -1, 1)
      lean = np.where(targets == tokenizer_lib.PAD_ID, np.nan, lean)
    passages.append({'pieces': [pieces[t] for t in targets],
                     'lean': [None if not np.isfinite(x) else round(float(x), 4) for x in lean]})
  return {'estimator': est, 'note': note + '; +1 = tower 0, -1 = tower 1, null = not scored',
          'passages': passages}


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(type(x))


def _clean(x):
  """Plain Python numbers; NaN stays NaN (json writes NaN, json.load reads it back; n/a)."""
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(_clean(obj), f, indent=1, default=_json_default)
    f.write('\n')
  os.replace(tmp, path)


def planted_labels(config, sp):
  """(planted module, class label per piece) for planted corpora, else None."""
  if config.data.source != 'planted':
    return None
  from twotower_jax import planted  # pylint: disable=g-import-not-at-top
  return planted, np.asarray(planted.token_classes(config, sp))


# ---------------------------------------------------------------- entry point


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores the estimators, writes DIR/analysis/*, returns the summary."""
  workdir = os.path.abspath(workdir)
  setup, params, step = restore(config, workdir)
  out_dir = os.path.join(workdir, ANALYSIS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  return analyze(setup, params, step, config, workdir, out_dir)


def analyze(setup, params, step, config, workdir, out_dir) -> dict[str, Any]:
  a, n_towers = config.analysis, config.model.n_towers
  sp = setup.tokenizer
  if len(setup.splits.val_windows) == 0:
    raise AnalysisError('the run has no held-out windows to score; give it more data')
  ctx = est_lib.Context(config=config, model=setup.model, params=params,
                        eval_batches=est_lib.eval_batches(setup.splits.val_windows,
                                                          int(a.eval_windows),
                                                          config.train.batch_size),
                        train_windows=setup.splits.train_windows, analysis_dir=out_dir, step=step)
  names = estimator_names(config)
  ev = est_lib.eval_loss(ctx)
  log.info('analysis: step %d, %d scored positions, eval loss %.4f (%.0f tokens/s forward)',
           step, ev['n_positions'], ev['loss'], ev['tokens_per_s'])
  results = {}
  for name in names:
    results[name] = est_lib.score(ctx, name)
    log.info('analysis: %s done in %.1fs (+%.1fs preparing), %.0f tokens/s', name,
             results[name]['seconds'], results[name]['prepare_seconds'],
             results[name]['tokens_per_s'])
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  classes = dict(wordclass.piece_classes(sp, a.conllu or None))
  classes['source'] = 'treebank' if a.conllu else 'function_words'
  planted = planted_labels(config, sp)
  write_preference_csv(os.path.join(out_dir, 'preference.csv'), pieces, classes, results,
                       n_towers, None if planted is None else planted[1])
  struct = None
  if a.struct_conllu:
    from twotower_jax import structural_probe  # pylint: disable=g-import-not-at-top
    struct = structural_probe.run(setup, params, config, out_dir)
  view = token_view(ctx, results, pieces, sp, config)
  write_json(os.path.join(out_dir, 'token_view.json'), view)
  summary = {
      'workdir': workdir, 'step': int(step), 'n_towers': n_towers,
      'tower_type': config.model.tower_type, 'gate': config.model.gate,
      'n_positions': ev['n_positions'], 'n_eval_windows': int(min(a.eval_windows,
                                                                  len(setup.splits.val_windows))),
      'min_count': int(a.min_count), 'estimators': names, 'eval_loss': ev['loss'],
      'eval_tokens_per_s': ev['tokens_per_s'],
      'per_estimator': {name: estimator_summary(res, pieces, classes, n_towers, config, planted)
                        for name, res in results.items()},
      'agreement': agreement(results, a.min_count, a.n_boot, a.seed),
      'structural_probe': struct, 'token_view_estimator': view['estimator'],
  }
  write_json(os.path.join(out_dir, 'summary.json'), summary)
  report.write_report(out_dir)
  log.info('analysis: wrote %s', out_dir)
  return summary
