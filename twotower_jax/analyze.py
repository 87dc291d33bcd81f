"""Analyse a run: python -m twotower_jax.analyze --workdir=DIR [--config.analysis.x=v].

Writes DIR/analysis/ (preference.csv, summary.json, token_view.json, the report), or
--out=PATH; `--compare DIR1 DIR2 ...` compares analysed runs instead. See docs/ANALYSIS.md.
"""

import sys

from absl import flags
from ml_collections import config_flags

from twotower_jax import cli
from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import workdir as workdir_lib

_CONFIG = cli.define_config(config_flags.DEFINE_config_dict, 'config', config_lib.base_config(),
                            'Only --config.analysis.* and --config.imports '
                            '(modules with more estimators) are used.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory to analyse (read only, except '
                               'DIR/analysis/ when --out is not given).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: analysis.step, 0 = latest).')
_STEPS = flags.DEFINE_string('steps', None, "'all' or a comma list of checkpoint steps: analyse "
                             'each into DIR/analysis/steps/<step>/ and draw the statistics '
                             'against the training step (DIR/analysis/over_training.md).')
_COMPARE = flags.DEFINE_multi_string('compare', None, 'Analysed run directories to compare '
                                     '(give it once per run, or DIR1 DIR2 ... after it).')
_OUT = flags.DEFINE_string('out', None, 'Output directory: of the analysis (default '
                           'DIR/analysis; e.g. for a read-only workdir) or of --compare (default '
                           'DIR1/analysis/compare).')


def main(argv):
  import os  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  given, base = config_lib.to_dict(config), config_lib.to_dict(config_lib.base_config())
  for section in base:
    if section not in ('analysis', 'imports') and given[section] != base[section]:
      raise errors.UserError(f'--config.{section}.* cannot change an analysis (the run\'s '
                             'config.json decides it); only --config.analysis.* and '
                             '--config.imports are used')
  if _COMPARE.value:
    from twotower_jax.analysis import compare  # pylint: disable=g-import-not-at-top
    dirs = list(_COMPARE.value) + list(argv[1:])
    if len(dirs) < 2:
      raise errors.UserError('--compare needs at least two run directories')
    out = _OUT.value or os.path.join(workdir_lib.analysis_dir(dirs[0]), workdir_lib.COMPARE_DIR)
    compare.run_compare(dirs, out, min_count=config.analysis.min_count,
                        n_boot=config.analysis.n_boot, seed=config.analysis.seed,
                        given=bool(_OUT.value))
    return
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --config.analysis.eval_windows=32')
  if not _WORKDIR.value:
    raise errors.UserError('--workdir=DIR is required (a directory written by '
                           'python -m twotower_jax.main)')
  # The run's own analysis.* settings (config.json: e.g. a paper preset's probe input), with
  # the analysis.* fields given on this command line on top.
  overrides = {k: v for k, v in config_flags.get_override_values(flags.FLAGS['config']).items()
               if k.startswith('analysis.')}
  if _STEP.value is not None:
    overrides['analysis.step'] = _STEP.value
  from twotower_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  run_config = runner.load_config(_WORKDIR.value, imports=config.imports,
                                  analysis_overrides=overrides)
  if _STEPS.value:
    runner.run_over_training(run_config, _WORKDIR.value, _STEPS.value, _OUT.value)
  else:
    runner.run(run_config, _WORKDIR.value, _OUT.value)


if __name__ == '__main__':
  sys.exit(cli.run(main))
