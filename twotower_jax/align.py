"""Compare the token matrices of runs: python -m twotower_jax.align DIR1 DIR2 ... --out=OUT.

A tied run's table against an untied run's input table and output matrix (and any other
pair), with debiased linear CKA, nearest-neighbour overlap, cross-fitted Procrustes and
the basis-dependent row cosine, each with a bootstrap interval over tokens; runs that
differ only in train.seed give the reference level. Also draws the token table's input
and output gradient norms over training from each run's metrics.jsonl. Writes
OUT/alignment.json, OUT/alignment.md and OUT/figures/. See docs/COMPANIONS.md.
"""

import os
import sys

from absl import flags

from twotower_jax import cli
from twotower_jax import errors

_OUT = flags.DEFINE_string('out', None, 'Output folder (alignment.json, alignment.md, '
                           'figures/); replaced whole, so a new folder or an earlier output.')
_MIN_COUNT = flags.DEFINE_integer('min_count', 20, 'Compare the tokens seen at least this '
                                  "often in every run's training windows.")
_K = flags.DEFINE_integer('k', 10, 'Neighbours per token for the knn overlap.')
_N_BOOT = flags.DEFINE_integer('n_boot', 200, 'Bootstrap resamples over tokens.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the bootstrap and the Procrustes folds.')
_STEP = flags.DEFINE_integer('step', 0, 'Checkpoint step of every run (0 = each one\'s latest).')


def main(argv):
  dirs = argv[1:]
  if len(dirs) < 2:
    raise errors.UserError('give at least two run directories: python -m twotower_jax.align '
                           'DIR1 DIR2 ... --out=OUT')
  if not _OUT.value:
    raise errors.UserError('--out=OUT is required: the folder for alignment.json, alignment.md '
                           'and figures/ (e.g. --out=runs/alignment)')
  for name, value, low in (('min_count', _MIN_COUNT.value, 1), ('k', _K.value, 1),
                           ('n_boot', _N_BOOT.value, 1), ('step', _STEP.value, 0)):
    if value < low:
      raise errors.UserError(f'--{name}={value} must be >= {low}')
  from twotower_jax import staging  # pylint: disable=g-import-not-at-top
  from twotower_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.analysis import token_tables  # pylint: disable=g-import-not-at-top
  from twotower_jax.report import alignment as report  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(_OUT.value)
  if os.path.exists(os.path.join(out, workdir_lib.CONFIG_JSON)) or any(
      (os.path.abspath(d) + os.sep).startswith(out + os.sep) for d in dirs):
    raise errors.UserError(f'--out={out} is a run directory or holds one; give a folder of its '
                           'own (it is replaced whole)')
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(
      os.path.join(out, report.ALIGNMENT_JSON)):
    raise errors.UserError(f'--out={out} holds files that are not an earlier alignment; give a '
                           'new or empty folder (it is replaced whole)')
  workdir_lib.check_writable(out)
  runs = [token_tables.read_run(d, _STEP.value) for d in dirs]
  result = token_tables.compare_runs(runs, _MIN_COUNT.value, _K.value, _N_BOOT.value,
                                     _SEED.value)
  with staging.staged_dir(out) as staged:
    report.write(staged, result)
  print(os.path.join(out, report.ALIGNMENT_MD))


if __name__ == '__main__':
  sys.exit(cli.run(main))
