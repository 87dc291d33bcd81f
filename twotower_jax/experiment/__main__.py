"""Run an experiment: python -m twotower_jax.experiment --config=EXPERIMENT.py[:SCALE] --workdir=DIR

Trains and analyses every point into DIR/<point>/ (a finished point is kept, a half-trained
one resumes), then aggregates: DIR/results.json, results.md, figures/. One point per job on
a scheduler: --point=I (or, without --point, the scheduler's index in JOB_COMPLETION_INDEX or
SLURM_ARRAY_TASK_ID), then --aggregate once they are done. --list prints the points.
docs/EXPERIMENTS.md.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from twotower_jax import cli
from twotower_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file '
                                          '(get_config(scale)), e.g. '
                                          'configs/experiments/preference.py:cpu.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment directory: experiment.json, one '
                               'workdir per point, results.')
_POINT = flags.DEFINE_integer('point', None, 'Run only this point (0-based; --list shows them).')
_AGGREGATE = flags.DEFINE_boolean('aggregate', False, 'Only aggregate the finished points.')
_LIST = flags.DEFINE_boolean('list', False, 'Print the points (and their status with '
                             '--workdir) and exit.')
# Schedulers' own index of an array job's task, read when --point is not given.
INDEX_VARIABLES = ('JOB_COMPLETION_INDEX', 'SLURM_ARRAY_TASK_ID')


def point_from_env() -> int | None:
  """The point index a scheduler gives this job, or None."""
  for name in INDEX_VARIABLES:
    text = os.environ.get(name, '').strip()
    if text:
      try:
        return int(text)
      except ValueError:
        raise errors.UserError(f'{name}={text!r} is not an integer point index; unset it or '
                               'pass --point=I') from None
  return None


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --point=0')
  if sum([_POINT.value is not None, _AGGREGATE.value, _LIST.value]) > 1:
    raise errors.UserError('give at most one of --point, --aggregate and --list')
  from twotower_jax import experiment  # pylint: disable=g-import-not-at-top
  from twotower_jax.experiment import spec  # pylint: disable=g-import-not-at-top
  exp = cli.load_config(_CONFIG)
  points = spec.points(exp)
  if _LIST.value:
    print(experiment.listing(_WORKDIR.value, exp, points), flush=True)
    return
  if not _WORKDIR.value:
    raise errors.UserError('--workdir=DIR is required: a new directory, or the experiment\'s '
                           'to resume it')
  root = os.path.abspath(_WORKDIR.value)
  prov = experiment.provenance(config_flags.get_config_filename(flags.FLAGS['config']),
                               config_flags.get_override_values(flags.FLAGS['config']))
  if _AGGREGATE.value:
    experiment.aggregate(root, exp, points, prov)
    return
  index = _POINT.value if _POINT.value is not None else point_from_env()
  from twotower_jax import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.use([p.config for p in points if index is None or p.index == index])
  try:
    if index is not None:
      experiment.run_point(root, exp, points, index, prov)
    else:
      experiment.run_all(root, exp, points, prov)
  except experiment.runner.Stopped as e:  # a signal during training: saved, resumable
    sys.stderr.write(f'error: {e}\n')
    sys.exit(130 if e.signal_name == 'SIGINT' else 143)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  sys.exit(cli.run(main, config_files=('config',), rerun=cli.TRAINING_RERUN))
