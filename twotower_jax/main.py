"""Train: python -m twotower_jax.main --config=configs/default.py --workdir=DIR [--config.x=v].

Rerunning with the same DIR resumes. Bad input exits with one line on stderr.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

from twotower_jax import cli
from twotower_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, config.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --config.train.steps=200')
  from twotower_jax import train  # pylint: disable=g-import-not-at-top
  result = train.train_and_evaluate(cli.load_config(_CONFIG), _WORKDIR.value)
  if result.get('preempted'):
    return  # stopped by a signal after saving; the train loop logged how to resume
  ev = result['eval']
  logging.getLogger('twotower_jax').info('done: step %d, val loss %.4f, perplexity %.2f; results in %s',
               result['step'], ev['loss'], ev['perplexity'], result['workdir'])


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  sys.exit(cli.run(main))
