"""Train: python -m twotower_jax.main --config=configs/default.py --workdir=DIR [--config.x=v].

Rerunning with the same DIR resumes. Bad input exits with one line on stderr.
Several processes: add --coordinator_address/--num_processes/--process_id (automatic
on Cloud TPU VMs); see docs/SCALING.md.
Pre-flight without the hardware: --dry_run=TARGET (v5e-8, v4-32, H100, ...) lowers the
train step for the target on this machine's CPU and prints its memory estimate, FLOPs,
expected step time, tokens and the whole run's wall time at that step time
(train/dryrun.py); it needs no --workdir and writes nothing.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

from twotower_jax import cli
from twotower_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, config.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 'auto: join a multi-process run when the flags/env below are '
                                 'set or on a Cloud TPU VM; on: always (JAX cluster detection).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '',
                                   'HOST:PORT of process 0 (or env JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0,
                                      'Processes in the run (or env JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1,
                                   'This process, 0..num_processes-1 (or env JAX_PROCESS_ID).')
_DRY_RUN = flags.DEFINE_string('dry_run', '', 'Pre-flight on CPU for a target (v5e-8, v4-32, '
                               'v5p-8, v6e-8, H100, H100x8, H200, A100): memory estimate, '
                               'FLOPs, step time, tokens and the run\'s wall time; trains nothing.')
_DRY_RUN_MFU = flags.DEFINE_float('dry_run_mfu', 0.45, 'MFU the dry run assumes for the '
                                  'expected step time.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --config.train.steps=200')
  if _DRY_RUN.value:
    dry_run(cli.load_config(_CONFIG), _DRY_RUN.value, _DRY_RUN_MFU.value)
    return
  if not _WORKDIR.value:  # '' would train into the current directory
    raise errors.UserError('--workdir=DIR is required: a new directory, or an earlier run\'s to '
                           'resume it')
  from twotower_jax import cpu_devices  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import distributed  # pylint: disable=g-import-not-at-top
  config = cli.load_config(_CONFIG)
  if not distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                _PROCESS_ID.value):  # before any other JAX use
    cpu_devices.use([config])  # one CPU device per core, before JAX starts its backend
  from twotower_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  setup_lib.check_config(config)  # imports config.imports, which may register estimators
  runner.check_config(config)  # the analysis settings too: the job analyses after training
  result = train.train_and_evaluate(config, _WORKDIR.value)
  if result.get('preempted'):  # stopped by a signal after saving; the loop logged how to resume
    if result.get('signal') == 'SIGINT':
      sys.exit(130)  # Ctrl-C: the shell's convention, so `main && analyze` stops here
    return
  ev = result['eval']
  logging.getLogger('twotower_jax').info('done: step %d, val loss %.4f, perplexity %.2f; results in %s',
               result['step'], ev['loss'], ev['perplexity'], result['workdir'])


def dry_run(config, target_name: str, mfu: float) -> None:
  """Prints the pre-flight report of `config` on target `target_name` (no JAX use before)."""
  from twotower_jax.train import dryrun  # pylint: disable=g-import-not-at-top
  target = dryrun.target(target_name)
  dryrun.use_cpu_devices(target.devices)  # before JAX starts its backend
  print(dryrun.format_report(dryrun.run(config, target, mfu), config), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])  # --workdir too, unless --dry_run (checked in main)
  sys.exit(cli.run(main, config_files=('config',), rerun=cli.TRAINING_RERUN, sigterm=False))
