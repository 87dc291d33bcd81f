"""The analysis of a run: which tower predicts each vocabulary item, with statistics.

Restores a checkpoint through run.py, scores the requested estimators on the same
held-out positions and writes DIR/analysis/ (file names and formats: workdir.py and
docs/ANALYSIS.md): preference.csv, summary.json, token_view.json, the structural
probe when a treebank is given, and the report. The outputs are written into a
staging folder renamed into place at the end (staging.staged_dir), so DIR/analysis
holds one step's outputs or none; `out_dir` writes them elsewhere (a read-only DIR).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import paths
from twotower_jax import report
from twotower_jax import run as run_lib
from twotower_jax import staging
from twotower_jax import preference_table
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import estimators as est_lib
from twotower_jax.analysis import multiplicity
from twotower_jax.analysis import summary as summary_lib
from twotower_jax.analysis import token_view as token_view_lib
from twotower_jax.analysis import wordclass
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import planted
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.data import windows as windows_lib
from twotower_jax.train import checkpoints

log = logging.getLogger('twotower_jax')


class AnalysisError(errors.UserError):
  """A workdir that cannot be analysed; the message says what to do."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """analysis.estimators names registered estimators."""
  names = config_lib.estimator_list(config.analysis.estimators)
  unknown = [n for n in names if n not in est_lib.ESTIMATORS]
  if not names or unknown:
    raise config_lib.ConfigError(f'analysis.estimators={config.analysis.estimators!r}: use a '
                                 f'comma list of {sorted(est_lib.ESTIMATORS)}')
  if config.analysis.lens:
    from twotower_jax.analysis import tuned_lens  # pylint: disable=g-import-not-at-top
    tuned_lens.check_config(config)
  est, _ = multiplicity.parse_primary(config.analysis.primary)
  if est not in est_lib.ESTIMATORS:
    raise config_lib.ConfigError(f'analysis.primary={config.analysis.primary!r}: {est!r} is not '
                                 f'an estimator; use one of {sorted(est_lib.ESTIMATORS)}, e.g. '
                                 'resample/class')


def load_config(workdir: str, analysis: ml_collections.ConfigDict | None = None,
                imports: str = '', analysis_overrides: dict[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """The run's config with `analysis` (a whole analysis.* section) in its place or the
  command line's analysis.* fields (`analysis_overrides`) on the run's own, checked;
  `imports` (more modules, e.g. a new estimator) are added to the run's own."""
  config = run_lib.load_config(workdir, analysis, imports, analysis_overrides)
  check_config(config)
  return config


def estimator_names(config: ml_collections.ConfigDict) -> tuple[list[str], dict[str, str]]:
  """The requested estimators that apply to this model, and why each other one does not."""
  names, skipped = [], {}
  for name in config_lib.estimator_list(config.analysis.estimators):
    reason = est_lib.get(name).skip_reason(config)
    if reason:
      log.info('analysis: skipping estimator %s: %s', name, reason)
      skipped[name] = reason
    else:
      names.append(name)
  return names, skipped


def planted_labels(config: ml_collections.ConfigDict, sp) -> np.ndarray | None:
  """The planted class of each piece for planted corpora, else None."""
  if config.data.source != 'planted':
    return None
  return np.asarray(planted.token_classes(config, sp))


PROBE_SEEN = 20  # the report says how many scored items a probe saw this often in training


def _estimator_entry(name, res, pieces, classes, config, item_loss_V, planted_V,
                     alt_classes) -> dict[str, Any]:
  """summary.json's block for one estimator: its statistics, meaning and own record."""
  est = est_lib.get(name)
  out = summary_lib.estimator_summary(res, pieces, classes, config.model.n_towers, config,
                                      item_loss_V, planted_V, alt_classes)
  out['description'] = est.description
  # Over the scored positions (not items): each tower's mean value and each extra's mean,
  # e.g. the gate's share of tokens per tower and its argmax deferral's loss.
  with np.errstate(invalid='ignore'):
    total = float(np.sum(res['count']))
    out['position_means'] = [float(np.nansum(res['count'] * m) / total) for m in res['mean_NxV']]
    out['extra_means'] = {k: float(np.nansum(res['count'] * v) / total)
                          for k, v in res.get('extras', {}).items()}
  if est.summary is not None:
    out.update(est.summary(res['state']))
  counts = res['state'].get('train_counts_V') if isinstance(res['state'], dict) else None
  if counts is not None and isinstance(out.get('training'), dict):
    scored = (res['count'] >= config.analysis.min_count) & np.isfinite(res['pref'])
    out['training'].update(scored_items_seen=int(np.sum(scored & (counts >= PROBE_SEEN))),
                           seen_threshold=PROBE_SEEN)
  return out


# What a re-analysis carries over from the folder it replaces: the trained probe heads, and
# what --steps and --compare wrote there (a plain analysis never deletes another mode's work).
OTHER_MODES = (workdir_lib.STEPS_DIR, workdir_lib.COMPARE_DIR, workdir_lib.OVER_TRAINING_JSON,
               workdir_lib.OVER_TRAINING_MD, os.path.join(workdir_lib.FIG_DIR, 'over_training.png'))
CARRIED = (workdir_lib.PROBE_DIR,) + OTHER_MODES


def check_out(out_dir: str, workdir: str, given: bool = True) -> None:
  """AnalysisError when `out_dir` may not hold the analysis of `workdir` (staging.refusal):
  a given --out must be new, empty or hold an earlier analysis of any mode."""
  markers = (workdir_lib.SUMMARY_JSON,) + OTHER_MODES if given else None
  why = staging.refusal(out_dir, 'analysis', markers, reads=(workdir,))
  if why:
    raise AnalysisError(why)


def word_classes(a: ml_collections.ConfigDict, sp) -> tuple[dict, dict | None]:
  """The word classes the tests use, and with a treebank the built-in list's beside them
  (the sensitivity check: does the class claim depend on the word-class source?)."""
  classes = dict(wordclass.piece_classes(sp, a.conllu or None, a.word_classes or None))
  classes['source'] = ('treebank' if a.conllu else 'word_list' if a.word_classes else
                       'function_words')
  if classes['source'] != 'treebank':
    return classes, None
  alt = dict(wordclass.piece_classes(sp, None), source='function_words')
  return classes, alt


def run(config: ml_collections.ConfigDict, workdir: str, out_dir: str | None = None
        ) -> dict[str, Any]:
  """Restores the checkpoint analysis.step, scores the estimators, writes out_dir/* (default
  DIR/analysis) all at once: a kill at any moment leaves the outputs of one step or none."""
  workdir = paths.absolute(workdir)
  given = bool(out_dir)
  out_dir = paths.absolute(out_dir or workdir_lib.analysis_dir(workdir))
  check_out(out_dir, workdir, given)
  with contextlib.ExitStack() as stack:
    try:  # first, so an unwritable place is reported before minutes of work
      staged = stack.enter_context(staging.staged_dir(out_dir, keep=CARRIED))
    except OSError as e:
      raise AnalysisError(
          f'cannot write the analysis to {out_dir} ({e.strerror}); pass --out=PATH to write '
          'it elsewhere (e.g. for a read-only workdir)') from None
    restored = run_lib.restore(config, workdir, int(config.analysis.step))
    summary = analyze(restored, workdir, staged)
  log.info('analysis: wrote %s', out_dir)
  return summary


def kept_steps(workdir: str) -> list[int]:
  """The complete checkpoints of a run, oldest first."""
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    steps = [s for s in sorted(mngr.all_steps())
             if checkpoints.is_complete(paths.join(str(mngr.directory), str(s)))]
  finally:
    mngr.close()
  if not steps:
    raise AnalysisError(f'{checkpoints.directory(workdir)} holds no complete checkpoint; train '
                        'the run first')
  return steps


def run_over_training(config: ml_collections.ConfigDict, workdir: str, steps: str,
                      out_dir: str | None = None) -> dict[str, Any]:
  """Analyses each checkpoint in `steps` ('all' or a comma list) into OUT/steps/<s>/ (OUT:
  `out_dir` or DIR/analysis) and draws the headline statistics against the training step
  (report/trajectory.py)."""
  workdir = paths.absolute(workdir)
  kept = kept_steps(workdir)
  if steps.strip() == 'all':
    chosen = kept
  else:
    try:
      chosen = sorted({int(s) for s in steps.split(',') if s.strip()})
    except ValueError:
      raise AnalysisError(f"--steps={steps!r}: give 'all' or a comma list of checkpoint steps, "
                          f'e.g. --steps={",".join(map(str, kept[:3]))}') from None
  missing = [s for s in chosen if s not in kept]
  if missing or not chosen:
    raise AnalysisError(f'--steps: no checkpoint for step(s) {missing}; kept: {kept}')
  root = paths.absolute(out_dir or workdir_lib.analysis_dir(workdir))
  check_out(root, workdir, bool(out_dir))
  paths.makedirs(root)
  for i, step in enumerate(chosen):
    config.analysis.step = step
    log.info('analysis over training: step %d of %s', step, chosen)
    try:
      run(config, workdir, paths.join(root, workdir_lib.STEPS_DIR, str(step)))
    except (run_lib.RunError, checkpoints.CheckpointError):
      _raise_if_deleted(workdir, step, chosen[i + 1:], root)
      raise
  if not paths.is_remote(root):
    return report.write_over_training(root)
  with paths.local_dir() as local:  # the report reads and writes local files: stage them
    steps_dir = paths.join(root, workdir_lib.STEPS_DIR)
    for step in paths.listdir(steps_dir):
      summary = paths.join(steps_dir, step, workdir_lib.SUMMARY_JSON)
      if step.isdigit() and paths.exists(summary):
        os.makedirs(os.path.join(local, workdir_lib.STEPS_DIR, step))
        workdir_lib.write_json(os.path.join(local, workdir_lib.STEPS_DIR, step,
                                            workdir_lib.SUMMARY_JSON),
                               workdir_lib.read_json(summary))
    result = report.write_over_training(local)
    for name in (workdir_lib.OVER_TRAINING_JSON, workdir_lib.OVER_TRAINING_MD):
      paths.write_atomic(paths.join(root, name),
                         paths.read_bytes(os.path.join(local, name)))
    paths.copy_tree(os.path.join(local, workdir_lib.FIG_DIR), paths.join(root, workdir_lib.FIG_DIR))
  return result


def _raise_if_deleted(workdir: str, step: int, rest: list[int], root: str) -> None:
  """An AnalysisError naming the steps still kept when checkpoint `step` is gone (deleted
  while --steps ran: a training run's rotation); else returns (the first error stands)."""
  kept = checkpoints.complete_steps(workdir)
  if step in kept:
    return
  now = [s for s in rest if s in kept]
  rerun = f'rerun with --steps={",".join(map(str, now))}' if now else 'no later step is kept'
  raise AnalysisError(
      f'--steps: checkpoint {step} was deleted while the analysis ran (a training run on this '
      'workdir keeps only its newest train.keep_checkpoints); the steps analysed before it are '
      f'in {paths.join(root, workdir_lib.STEPS_DIR)}; {rerun}') from None


def held_out_windows(setup, pattern: str) -> tuple[np.ndarray, list[str]]:
  """The held-out windows to score and the documents they come from: every held-out
  document, or (analysis.eval_documents) those whose name the regex finds, packed alone.
  A run of some eras (data.sotu_years) chooses among the whole collection's held-out
  speeches, which no era's run trains on: an era's expert can be scored on another era."""
  corpus = setup.corpus
  if not pattern:
    return setup.splits.val_windows, list(corpus.val_names)
  if setup.config.data.get('sotu_years'):
    every_era = config_lib.from_dict(config_lib.to_dict(setup.config.data))
    every_era.sotu_years = ''
    corpus = corpus_lib.load(every_era)
  names = list(corpus.val_names)
  keep = [i for i, name in enumerate(names) if re.search(pattern, name)]
  if not keep:
    raise AnalysisError(f'analysis.eval_documents={pattern!r} matches none of the '
                        f'{len(names)} held-out documents (e.g. {", ".join(names[:3])}); '
                        'fix the regex')
  ids = tokenizer_lib.encode_docs(setup.tokenizer, [corpus.val_docs[i] for i in keep])
  return windows_lib.pack_windows(ids, setup.config.data.seq_len), [names[i] for i in keep]


def analyze(restored: run_lib.Run, workdir: str, out_dir: str) -> dict[str, Any]:
  config, setup, step = restored.config, restored.setup, restored.step
  a, n_towers = config.analysis, config.model.n_towers
  sp = setup.tokenizer
  if len(setup.splits.val_windows) == 0:
    raise AnalysisError('the run has no held-out windows to score; give it more data')
  val, eval_docs = held_out_windows(setup, a.eval_documents)
  batch, n_windows = config.train.batch_size, int(a.eval_windows)
  batches, docs = est_lib.base.scored_batches(val, n_windows, batch, int(a.mask_draws))
  ctx = est_lib.Context(config=config, model=setup.model, params=restored.params,
                        eval_batches=batches, eval_docs=docs,
                        train_windows=setup.splits.train_windows, analysis_dir=out_dir, step=step)
  names, skipped = estimator_names(config)
  if a.lens:  # its layer widths are checked before minutes of work
    from twotower_jax.analysis import tuned_lens  # pylint: disable=g-import-not-at-top
    tuned_lens.states_fn(ctx.model, ctx.params, val.shape[1] - 1)
  ev = est_lib.base.tower_pass(ctx)
  log.info('analysis: step %d, %d scored positions, eval loss %.4f (%.0f tokens/s forward)',
           step, ev['n_positions'], ev['loss'], ev['tokens_per_s'])
  results = {}
  for name in names:
    results[name] = est_lib.base.score(ctx, name)
    log.info('analysis: %s done in %.1fs (+%.1fs preparing), %.0f tokens/s', name,
             results[name]['seconds'], results[name]['prepare_seconds'],
             results[name]['tokens_per_s'])
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  classes, alt_classes = word_classes(a, sp)
  planted_V = planted_labels(config, sp)
  preference_table.write_preference_csv(paths.join(out_dir, workdir_lib.PREFERENCE_CSV), pieces,
                                   classes, results, planted_V, ctx.item_loss)
  struct = None
  if a.struct_conllu:
    from twotower_jax.analysis import structural_probe  # pylint: disable=g-import-not-at-top
    struct = structural_probe.run(setup, restored.params, config, out_dir)
  lens = None
  if a.lens:
    from twotower_jax.analysis import tuned_lens  # pylint: disable=g-import-not-at-top
    lens = tuned_lens.run(ctx, out_dir)
  view = token_view_lib.token_view(ctx, results, pieces,
                                   {name: res['state'] for name, res in results.items()})
  workdir_lib.write_json(paths.join(out_dir, workdir_lib.TOKEN_VIEW_JSON), view)
  per_estimator = {name: _estimator_entry(name, res, pieces, classes, config, ctx.item_loss,
                                          planted_V, alt_classes)
                   for name, res in results.items()}
  summary = {
      'workdir': workdir, 'step': int(step), 'n_towers': n_towers,
      'tower_type': config.model.tower_type, 'gate': config.model.gate,
      'n_positions': ev['n_positions'],
      'n_eval_windows': int(min(a.eval_windows or len(val), len(val))),
      'mask_draws': int(a.mask_draws), 'eval_documents': eval_docs,
      'min_count': int(a.min_count), 'estimators': names, 'estimators_skipped': skipped,
      'eval_loss': ev['loss'],
      'eval_tokens_per_s': ev['tokens_per_s'],
      'per_estimator': per_estimator,
      'tests': multiplicity.family(per_estimator, a.primary, a.alpha),
      'word_class_source': classes['source'],
      'agreement': summary_lib.agreement(results, a.min_count, a.n_boot, a.seed),
      'structural_probe': struct, 'token_view_estimator': view['estimator'],
      'tuned_lens_seconds': None if lens is None else lens['seconds'],
  }
  workdir_lib.write_json(paths.join(out_dir, workdir_lib.SUMMARY_JSON), summary)
  report.write_report(out_dir)
  return summary
