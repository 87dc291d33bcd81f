"""Train: python -m twotower_jax.main --config=configs/default.py --workdir=DIR [--config.x=v].

Rerunning with the same DIR resumes. Bad input exits with one line on stderr.
Several processes: add --coordinator_address/--num_processes/--process_id (automatic
on Cloud TPU VMs); see docs/SCALING.md.
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


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --config.train.steps=200')
  if not _WORKDIR.value:  # '' would train into the current directory
    raise errors.UserError('--workdir=DIR is required: a new directory, or an earlier run\'s to '
                           'resume it')
  from twotower_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)  # before any other JAX use
  from twotower_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  result = train.train_and_evaluate(cli.load_config(_CONFIG), _WORKDIR.value)
  if result.get('preempted'):  # stopped by a signal after saving; the loop logged how to resume
    if result.get('signal') == 'SIGINT':
      sys.exit(130)  # Ctrl-C: the shell's convention, so `main && analyze` stops here
    return
  ev = result['eval']
  logging.getLogger('twotower_jax').info('done: step %d, val loss %.4f, perplexity %.2f; results in %s',
               result['step'], ev['loss'], ev['perplexity'], result['workdir'])


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  sys.exit(cli.run(main, config_files=('config',)))
