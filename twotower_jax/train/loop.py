"""The training loop: config + workdir in, checkpoints and metrics out.

Rerunning with the same workdir resumes from the latest checkpoint (params,
optimizer, step, rng and data position), so an interrupted run continues exactly.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import cpu_devices
from twotower_jax import hostmem
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.data import windows as data_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.model import partitioning
from twotower_jax.train import checkpoints
from twotower_jax.train import init_from
from twotower_jax.train import metrics as metrics_lib
from twotower_jax.train import nonfinite
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import preemption
from twotower_jax.train import preflight as preflight_lib
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib

log = logging.getLogger('twotower_jax')

# Changing these in an existing workdir would change what the checkpoints mean.
_FROZEN_SECTIONS = ('model', 'data')
_LOG_KEYS = ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'mfu')


def check_workdir(config: ml_collections.ConfigDict, workdir: str
                  ) -> ml_collections.ConfigDict | None:
  """Refuses a workdir whose earlier run had a different model or data config, or whose
  checkpoints lost a file they need; returns that run's config (None: a new workdir)."""
  steps = checkpoints.complete_steps(workdir)
  if not paths.exists(workdir_lib.path(workdir, workdir_lib.CONFIG_JSON)):
    if steps:
      raise workdir_lib.WorkdirError(
          f'{workdir} has checkpoints (up to step {steps[-1]}) but no config.json, so this run '
          'cannot be checked against them; put back the config.json of the run that wrote '
          'them, or use a new --workdir')
    return None
  old_config = workdir_lib.read_config(workdir)
  old, new = (config_lib.without_compile_only(config_lib.to_dict(c))
              for c in (old_config, config))
  diffs = []
  for section in _FROZEN_SECTIONS:
    for key in sorted(set(old.get(section, {})) | set(new.get(section, {}))):
      a, b = old.get(section, {}).get(key), new.get(section, {}).get(key)
      if a != b:
        diffs.append(f'{section}.{key}: {a!r} -> {b!r}')
  if diffs:
    raise config_lib.ConfigError(
        f'{workdir} holds a run with a different config ({"; ".join(diffs[:4])}); '
        'use a new --workdir for a new run, or the original values to resume')
  tokenizer = workdir_lib.path(workdir, workdir_lib.TOKENIZER)
  if steps and not paths.exists(tokenizer):
    raise tokenizer_lib.TokenizerError(
        f'{tokenizer} is missing but the checkpoints in {workdir} were trained with it; put '
        'the file back (a newly trained one would not match them), or use a new --workdir')
  return old_config


def eval_windows(config: ml_collections.ConfigDict, meta: dict[str, Any] | None,
                 old_config: ml_collections.ConfigDict | None) -> int:
  """How many held-out windows the run evaluates: eval_batches x batch_size when it started,
  kept by a resumed run whatever its batch size (saved with each checkpoint), so eval
  losses before and after a resume are comparable."""
  if meta is not None and 'eval_windows' in meta:
    return int(meta['eval_windows'])
  tc = (old_config if meta is not None and old_config is not None else config).train
  return tc.batch_size * tc.eval_batches


def evaluate(eval_fn, params, batches: list[np.ndarray], batch_sh, batch_size: int,
             per_word: bool = False) -> dict:
  """Loss over the eval batches; with target weights also `loss_all` over every target.

  Also in units that compare across tokenizers: `bits_per_byte` of the targets' text, and
  with `per_word` (tokenizer_type='word': each target a word or EOS) `bits_per_word`.
  """
  sums = {'loss_sum': 0.0, 'weight_sum': 0.0}
  outs = []
  for i, rows in enumerate(batches):
    local = _local_rows(rows, batch_sh)
    out = eval_fn(params, sharding_lib.global_batch(local, batch_sh, batch_size),
                  np.int32(i))  # batch i's own example key (masked LM: masks vary by batch)
    sums = {k: sums.get(k, 0.0) + v for k, v in out.items()}
    outs.append(out)
    cpu_devices.wait_behind(outs)  # a short queue: XLA:CPU collectives hung with many
  loss = float(sums['loss_sum']) / max(float(sums['weight_sum']), 1.0)
  result = {'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': float(sums['weight_sum'])}
  if 'bytes_sum' in sums:
    result['bits_per_byte'] = float(sums['loss_sum']) / max(float(sums['bytes_sum']), 1.0) / (
        math.log(2))
  if per_word:
    result['bits_per_word'] = loss / math.log(2)
  if 'loss_sum_all' in sums:
    result['loss_all'] = float(sums['loss_sum_all']) / max(float(sums['weight_sum_all']), 1.0)
  return result


def _local_rows(global_rows: np.ndarray, batch_sh) -> np.ndarray:
  """This process's contiguous block of a global batch (the rows its devices hold)."""
  start, stop = sharding_lib.process_rows(batch_sh, global_rows.shape[0])
  return global_rows[start:stop]


def _check_nonfinite(new: list[dict[str, jax.Array]], step: int, streak: int, names: list[str],
                     tc: ml_collections.ConfigDict, saver: checkpoints.Saver,
                     writer: metrics_lib.Writer) -> int:
  """Stops the run at a non-finite step ('stop') or at train.max_consecutive_skips skipped
  updates in a row ('skip'); returns the run of skipped steps so far.

  `new` are the metrics of the steps up to `step` not checked before; the stop names
  the first bad step and quantity and the last good checkpoint, and saves nothing.
  """
  flags = jax.device_get([m[nonfinite.FLAGS_KEY] for m in new])
  first = step - len(new) + 1
  bad_S = [not np.all(f) for f in flags]
  if tc.on_nonfinite == 'skip':
    streak, at = nonfinite.skip_streak(bad_S, streak, tc.max_consecutive_skips)
    if at is None:
      return streak
    name = nonfinite.first_offender(flags[at], names)
    what = (f'{tc.max_consecutive_skips} updates in a row were skipped as non-finite (the last: '
            f'{name})')
    fix = 'lower optimizer.lr, or raise train.max_consecutive_skips'
  else:
    if not any(bad_S):
      return 0
    at = bad_S.index(True)
    name = nonfinite.first_offender(flags[at], names)
    what = f'{name} is not finite (NaN or inf)'
    fix = 'lower optimizer.lr or set --config.train.on_nonfinite=skip'
  saver.wait()  # the good checkpoints already started are kept
  last = saver.latest()
  saver.close()
  writer.write('nonfinite', {'quantity': name}, first + at)
  writer.close()
  raise nonfinite.NonFiniteError(
      f'step {first + at}: {what}; stopped without saving, last good checkpoint is step '
      f'{"none" if last is None else last}; {fix}')


def jit_train_step(config: ml_collections.ConfigDict, model, tx, mesh, state_sh,
                   batch_sh, target_weights_V: np.ndarray | None = None) -> Any:
  """The jitted train step with explicit shardings and the state donated (also for bench/)."""
  tc = config.train
  step = functools.partial(step_lib.train_step, model=model, tx=tx,
                           lr_schedule=optimizer_lib.schedule(config),
                           grad_accum_steps=tc.grad_accum_steps, on_nonfinite=tc.on_nonfinite,
                           target_weights_V=_constant(target_weights_V),
                           trainable=tc.trainable, loss_chunk=tc.loss_chunk)
  return jax.jit(partitioning.with_rules(step, mesh, sharding_lib.rules(config)),
                 in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)


def _constant(x_V: np.ndarray | None):
  return None if x_V is None else jax.numpy.asarray(x_V)


def jit_eval_step(config: ml_collections.ConfigDict, model, mesh, params_sh, batch_sh,
                  target_weights_V: np.ndarray | None = None,
                  bytes_V: np.ndarray | None = None) -> Any:
  """The jitted eval step with explicit shardings (summed loss and weight, replicated)."""
  step = functools.partial(step_lib.eval_step, model=model,
                           target_weights_V=_constant(target_weights_V),
                           bytes_V=_constant(bytes_V))
  return jax.jit(partitioning.with_rules(step, mesh, sharding_lib.rules(config)),
                 in_shardings=(params_sh, batch_sh, sharding_lib.replicated(mesh)),
                 out_shardings=sharding_lib.replicated(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to config.train.steps (resuming if DIR has checkpoints); returns final eval.

  Process 0 holds DIR/train.lock for the whole run: a second run on DIR is refused.
  """
  setup_lib.check_config(config)
  workdir = paths.absolute(workdir)
  if jax.process_index() != 0:
    return _train(config, workdir)
  with workdir_lib.training_lock(workdir):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  old_config = check_workdir(config, workdir)
  if not checkpoints.complete_steps(workdir):  # a resumed run no longer reads its sources
    init_from.check_sources(config, workdir)
  setup = setup_lib.build(config, workdir)
  mesh, model, splits, tc = setup.mesh, setup.model, setup.splits, config.train
  axis_rules = sharding_lib.rules(config)

  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(model, tx, mesh, axis_rules)
  abstract_state = state_lib.abstract(model, tx, state_sh)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  if jax.local_devices()[0].platform == 'cpu':  # before the state is made
    preflight_lib.check_state_memory(abstract_state, preflight_lib.host_available_bytes())
  batch_sh = sharding_lib.batch_sharding(mesh, axis_rules)

  train_iter = iter(data_lib.train_dataset(splits.train_windows, tc.batch_size, tc.seed,
                                           jax.process_index(), jax.process_count(),
                                           sharding_lib.process_rows(batch_sh, tc.batch_size)))
  tokenizer_digest = tokenizer_lib.file_digest(workdir_lib.path(workdir, workdir_lib.TOKENIZER))
  mngr = checkpoints.manager(workdir, tc.keep_checkpoints)
  start = checkpoints.latest_complete_step(mngr, remove_incomplete=True)
  meta, taken = None, []
  if start is not None:  # restore (and fail on a bad checkpoint) before writing anything
    legacy = state_lib.legacy_target(config, lambda t: state_lib.abstract(
        model, t, state_lib.shardings(model, t, mesh, axis_rules)))
    state, meta = checkpoints.restore(mngr, start, abstract_state, train_iter, legacy)
    tokenizer_lib.check_digest(tokenizer_digest, meta.get('tokenizer_sha256'), workdir)
  else:
    state = state_lib.create_sharded(model, tx, tc.seed, state_sh)
    if any(config_lib.init_tower_entries(config.model.init_towers)):  # before writing anything
      state, taken = init_from.apply(state, config, model, tokenizer_digest, mesh)
  optimizer_lib.check_trainable(tc.trainable, state.params)
  target_weights_V = corpus_lib.target_weights(config.data, setup.tokenizer)
  n_eval = eval_windows(config, meta, old_config)
  # Compiled before anything is written: a step that cannot run leaves the workdir as it was.
  train_fn = jit_train_step(config, model, tx, mesh, state_sh, batch_sh, target_weights_V)
  eval_fn = jit_eval_step(config, model, mesh, state_sh.params, batch_sh, target_weights_V,
                          tokenizer_lib.piece_bytes(setup.tokenizer))
  per_word = config.data.tokenizer_type == 'word'
  preflight = preflight_lib.run(train_fn, state, batch_sh, config, model)
  train_fn = preflight.compiled  # the loop runs the executable compiled ahead of time
  if is_main:
    workdir_lib.write_config(config, workdir)
    preflight_lib.check_disk(checkpoints.directory(workdir), state_bytes, tc.keep_checkpoints + 1)
  saver = checkpoints.Saver(mngr, workdir, state_bytes)
  writer = metrics_lib.Writer(workdir, enabled=is_main, wandb_project=tc.wandb_project,
                              config=config_lib.to_dict(config))
  if start is not None:
    writer.truncate_after(start)
    log.info('resumed from %s at step %d', checkpoints.directory(workdir), start)
    if n_eval != tc.batch_size * tc.eval_batches:
      note = (f'the eval set stays the run\'s first {n_eval} held-out windows (train.batch_size x '
              f'train.eval_batches now gives {tc.batch_size * tc.eval_batches}), so eval losses '
              'stay comparable; use a new --workdir for another eval set')
      log.warning('%s', note)
      writer.write('eval_set', {'windows': n_eval,
                                'configured': tc.batch_size * tc.eval_batches, 'note': note}, start)
  else:
    writer.truncate_after(-1)  # lines of an earlier attempt that left no checkpoint
    start = 0
  n_params = model_lib.param_count(state.params)
  quantity_names = nonfinite.quantity_names(state.params)

  eval_rows = data_lib.eval_batches(splits.val_windows, tc.batch_size, n_eval)
  if start == 0:
    unigram = data_lib.unigram_cross_entropy(splits.train_token_counts, eval_rows)
    writer.write('run', {'params': n_params, 'devices': jax.device_count(),
                         'mesh': dict(mesh.shape), 'train_windows': len(splits.train_windows),
                         'val_windows': len(splits.val_windows),
                         'eval_windows': min(n_eval, len(splits.val_windows)),
                         'host_huge_pages': hostmem.active(), **preflight.summary()})
    writer.write('baseline', {'unigram_loss': unigram, 'unigram_perplexity': np.exp(unigram)})
    if taken:  # which checkpoint of which run gave each tower (model.init_towers)
      writer.write('init_towers', {'towers': taken})
  log.info('model: %s params, %d towers, mesh %s', f'{n_params:,}', config.model.n_towers,
           dict(mesh.shape))

  tokens_per_step = tc.batch_size * config.data.seq_len
  meta = {'n_params': n_params, 'tokenizer_sha256': tokenizer_digest, 'eval_windows': n_eval}
  pending: list[dict[str, jax.Array]] = []
  checked, streak = 0, 0  # steps of `pending` checked for non-finite values; skips in a row
  t_last, step_last, t_first = time.perf_counter(), start, None
  final_eval = None
  step = start
  stopped_by = None
  with preemption.watch(mngr) as watcher:
    while step < tc.steps:
      rows = next(train_iter)
      state, step_metrics = train_fn(state, sharding_lib.global_batch(rows, batch_sh,
                                                                      tc.batch_size))
      pending.append(step_metrics)
      cpu_devices.wait_behind(pending)  # a short queue: XLA:CPU collectives hung with many
      step += 1
      stop = watcher.should_stop(step, exchange=step % tc.log_every == 0)
      at_log = step % tc.log_every == 0 or step == tc.steps or stop
      at_eval = (step % tc.eval_every == 0 or step == tc.steps) and not stop
      at_save = step % tc.checkpoint_every == 0 or step == tc.steps or stop
      if at_log or at_eval or at_save:
        streak = _check_nonfinite(pending[checked:], step, streak, quantity_names, tc, saver,
                                  writer)
        checked = len(pending)
      if at_log:
        fetched = jax.device_get(pending)  # the only host sync between logs
        now = time.perf_counter()
        t_first = t_first or now
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]
                if k != nonfinite.FLAGS_KEY}
        mean['skipped'] = float(np.sum([m['skipped'] for m in fetched]))
        mean['lr'] = float(fetched[-1]['lr'])
        mean['tokens_per_s'] = (step - step_last) * tokens_per_step / (now - t_last)
        mean.update(preflight.throughput(step - step_last, now - t_last))
        eta = (tc.steps - step) * (now - t_last) / (step - step_last)
        writer.write('train', mean, step)
        if is_main:
          log.info(metrics_lib.log_line(step, tc.steps, mean, eta, keys=_LOG_KEYS))
          if mean['skipped']:
            log.warning('skipped %d non-finite update(s) up to step %d', mean['skipped'], step)
        pending, checked, t_last, step_last = [], 0, now, step
      if at_eval:
        final_eval = evaluate(eval_fn, state.params, eval_rows, batch_sh, tc.batch_size, per_word)
        writer.write('eval', final_eval, step)
        if is_main:
          log.info('eval step %d | loss %.4f | perplexity %.2f | bits/byte %.4f', step,
                   final_eval['loss'], final_eval['perplexity'], final_eval['bits_per_byte'])
      if at_save:
        saver.save(step, state, train_iter, dict(meta, step=step))
      if stop:
        stopped_by = watcher.signal_name
        break
    saver.wait()  # still under the handlers: a signal now cannot cut the save
  saver.close()
  writer.close()
  if stopped_by is not None:
    log.warning('stopped by %s at step %d; checkpoint saved, rerun the same command to resume',
                stopped_by, step)
    return {'step': step, 'eval': None, 'workdir': workdir, 'preempted': True,
            'signal': stopped_by}
  if final_eval is None:  # nothing left to train: report the checkpoint's eval
    final_eval = evaluate(eval_fn, state.params, eval_rows, batch_sh, tc.batch_size, per_word)
  return {'step': step, 'eval': final_eval, 'workdir': workdir}
