"""The training loop: config + workdir in, checkpoints and metrics out.

Rerunning with the same workdir resumes from the latest checkpoint (params,
optimizer, step, rng and data position), so an interrupted run continues exactly.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import hostmem
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.data import windows as data_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.model import partitioning
from twotower_jax.train import checkpoints
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


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose earlier run had a different model or data config."""
  if not os.path.exists(workdir_lib.path(workdir, workdir_lib.CONFIG_JSON)):
    return
  old = config_lib.to_dict(workdir_lib.read_config(workdir))
  new = config_lib.to_dict(config)
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


def evaluate(eval_fn, params, batches: list[np.ndarray], batch_sh, batch_size: int) -> dict:
  loss_sum, weight_sum = 0.0, 0.0
  for rows in batches:
    local = _local_rows(rows, batch_sh)
    out = eval_fn(params, sharding_lib.global_batch(local, batch_sh, batch_size))
    loss_sum, weight_sum = loss_sum + out['loss_sum'], weight_sum + out['weight_sum']
  loss = float(loss_sum) / max(float(weight_sum), 1.0)
  return {'loss': loss, 'perplexity': float(np.exp(loss)), 'tokens': float(weight_sum)}


def _local_rows(global_rows: np.ndarray, batch_sh) -> np.ndarray:
  """This process's contiguous block of a global batch (the rows its devices hold)."""
  start, stop = sharding_lib.process_rows(batch_sh, global_rows.shape[0])
  return global_rows[start:stop]


def _stop_if_nonfinite(pending: list[dict[str, jax.Array]], step: int, names: list[str],
                       mngr, writer: metrics_lib.Writer) -> None:
  """Raises NonFiniteError naming the first bad step and quantity among `pending`."""
  flags = jax.device_get([m[nonfinite.FLAGS_KEY] for m in pending])
  for i, flags_Q in enumerate(flags):
    name = nonfinite.first_offender(flags_Q, names)
    if name is None:
      continue
    bad_step = step - len(pending) + i + 1
    mngr.wait_until_finished()  # the good checkpoints already started are kept
    last = mngr.latest_step()
    mngr.close()
    writer.write('nonfinite', {'quantity': name}, bad_step)
    writer.close()
    raise nonfinite.NonFiniteError(
        f'step {bad_step}: {name} is not finite (NaN or inf); stopped without saving, last '
        f'good checkpoint is step {"none" if last is None else last}; lower optimizer.lr or set '
        '--config.train.on_nonfinite=skip')


def jit_train_step(config: ml_collections.ConfigDict, model, tx, mesh, state_sh,
                   batch_sh) -> Any:
  """The jitted train step with explicit shardings and the state donated (also for bench/)."""
  tc = config.train
  step = functools.partial(step_lib.train_step, model=model, tx=tx,
                           lr_schedule=optimizer_lib.schedule(config),
                           grad_accum_steps=tc.grad_accum_steps, on_nonfinite=tc.on_nonfinite)
  return jax.jit(partitioning.with_rules(step, mesh, sharding_lib.rules(config)),
                 in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)


def jit_eval_step(config: ml_collections.ConfigDict, model, mesh, params_sh, batch_sh) -> Any:
  """The jitted eval step with explicit shardings (summed loss and weight, replicated)."""
  step = functools.partial(step_lib.eval_step, model=model)
  return jax.jit(partitioning.with_rules(step, mesh, sharding_lib.rules(config)),
                 in_shardings=(params_sh, batch_sh), out_shardings=sharding_lib.replicated(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to config.train.steps (resuming if DIR has checkpoints); returns final eval."""
  setup_lib.check_config(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  check_workdir(config, workdir)
  setup = setup_lib.build(config, workdir)
  mesh, model, splits, tc = setup.mesh, setup.model, setup.splits, config.train
  axis_rules = sharding_lib.rules(config)

  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(model, tx, mesh, axis_rules)
  batch_sh = sharding_lib.batch_sharding(mesh, axis_rules)

  train_iter = iter(data_lib.train_dataset(splits.train_windows, tc.batch_size, tc.seed,
                                           jax.process_index(), jax.process_count(),
                                           sharding_lib.process_rows(batch_sh, tc.batch_size)))
  tokenizer_digest = tokenizer_lib.file_digest(workdir_lib.path(workdir, workdir_lib.TOKENIZER))
  mngr = checkpoints.manager(workdir, tc.keep_checkpoints)
  start = checkpoints.latest_complete_step(mngr, remove_incomplete=True)
  if start is not None:  # restore (and fail on a bad checkpoint) before writing anything
    state, meta = checkpoints.restore(mngr, start, state_lib.abstract(model, tx, state_sh),
                                      train_iter)
    tokenizer_lib.check_digest(tokenizer_digest, meta.get('tokenizer_sha256'), workdir)
  if is_main:
    workdir_lib.write_config(config, workdir)
  writer = metrics_lib.Writer(workdir, enabled=is_main)
  if start is not None:
    writer.truncate_after(start)
    log.info('resumed from %s at step %d', checkpoints.directory(workdir), start)
  else:
    writer.truncate_after(-1)  # lines of an earlier attempt that left no checkpoint
    state = state_lib.create_sharded(model, tx, tc.seed, state_sh)
    start = 0
  n_params = model_lib.param_count(state.params)
  quantity_names = nonfinite.quantity_names(state.params)

  train_fn = jit_train_step(config, model, tx, mesh, state_sh, batch_sh)
  eval_fn = jit_eval_step(config, model, mesh, state_sh.params, batch_sh)
  preflight = preflight_lib.run(train_fn, state, batch_sh, config, model)
  train_fn = preflight.compiled  # the loop runs the executable compiled ahead of time
  eval_rows = data_lib.eval_batches(splits.val_windows, tc.batch_size, tc.eval_batches)
  if start == 0:
    unigram = data_lib.unigram_cross_entropy(splits.train_token_counts, eval_rows)
    writer.write('run', {'params': n_params, 'devices': jax.device_count(),
                         'mesh': dict(mesh.shape), 'train_windows': len(splits.train_windows),
                         'val_windows': len(splits.val_windows),
                         'host_huge_pages': hostmem.active(), **preflight.summary()})
    writer.write('baseline', {'unigram_loss': unigram, 'unigram_perplexity': np.exp(unigram)})
  log.info('model: %s params, %d towers, mesh %s', f'{n_params:,}', config.model.n_towers,
           dict(mesh.shape))

  tokens_per_step = tc.batch_size * config.data.seq_len
  meta = {'n_params': n_params, 'tokenizer_sha256': tokenizer_digest}
  pending: list[dict[str, jax.Array]] = []
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
      step += 1
      stop = watcher.should_stop(step, exchange=step % tc.log_every == 0)
      at_log = step % tc.log_every == 0 or step == tc.steps or stop
      at_eval = (step % tc.eval_every == 0 or step == tc.steps) and not stop
      at_save = step % tc.checkpoint_every == 0 or step == tc.steps or stop
      if tc.on_nonfinite == 'stop' and (at_log or at_eval or at_save):
        _stop_if_nonfinite(pending, step, quantity_names, mngr, writer)
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
        pending, t_last, step_last = [], now, step
      if at_eval:
        final_eval = evaluate(eval_fn, state.params, eval_rows, batch_sh, tc.batch_size)
        writer.write('eval', final_eval, step)
        if is_main:
          log.info('eval step %d | loss %.4f | perplexity %.2f', step, final_eval['loss'],
                   final_eval['perplexity'])
      if at_save:
        checkpoints.save(mngr, step, state, train_iter, dict(meta, step=step))
      if stop:
        stopped_by = watcher.signal_name
        break
    mngr.wait_until_finished()  # still under the handlers: a signal now cannot cut the save
  mngr.close()
  writer.close()
  if stopped_by is not None:
    log.warning('stopped by %s at step %d; checkpoint saved, rerun the same command to resume',
                stopped_by, step)
    return {'step': step, 'eval': None, 'workdir': workdir, 'preempted': True}
  if final_eval is None:  # nothing left to train: report the checkpoint's eval
    final_eval = evaluate(eval_fn, state.params, eval_rows, batch_sh, tc.batch_size)
  return {'step': step, 'eval': final_eval, 'workdir': workdir}
