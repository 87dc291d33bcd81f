"""Known-answer validation of the estimators: python -m twotower_jax.validate --workdir=DIR
[--config=configs/planted.py] [--config.x=y ...] [--gate_steps=300] [--min_auc=0.95] [--alpha=0.05]

Trains on the planted language a syntax-only, a topic-only and an all-targets tower,
composes a known-answer model (tower 0 syntax, tower 1 topic) and a null model (two
identical towers) from them with frozen towers and a trained gate, analyses both with
every registered estimator and writes DIR/validation.json and DIR/validation.md
(twotower_jax/analysis/known_answer.py; docs/ANALYSIS.md, "Known-answer validation").
Exits 1 naming the failed checks; rerunning with the same DIR resumes.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

from twotower_jax import cli
from twotower_jax import errors

_CONFIG = cli.define_config(config_flags.DEFINE_config_file, 'config', 'configs/planted.py',
                            'A planted-language config (get_config()).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the five runs and the results.')
_GATE_STEPS = flags.DEFINE_integer('gate_steps', 300, 'Steps of gate training in the composed '
                                   'models (the one-tower runs train config.train.steps).')
_MIN_AUC = flags.DEFINE_float('min_auc', 0.95, 'Known-answer model: the planted-class AUC '
                              'every estimator must reach.')
_ALPHA = flags.DEFINE_float('alpha', 0.05, 'Null model: a split is p < alpha against the '
                            'control with an AUC interval that excludes its mean.')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --config.train.steps=300')
  from twotower_jax.analysis import known_answer  # pylint: disable=g-import-not-at-top
  result = known_answer.run(cli.load_config(_CONFIG), _WORKDIR.value, _GATE_STEPS.value,
                            _MIN_AUC.value, _ALPHA.value)
  log = logging.getLogger('twotower_jax')
  for c in result['checks']:
    log.info('validate: %-5s %-16s %s', 'ok' if c['passed'] else 'FAIL', c['name'], c['why'])
  log.info('validate: wrote %s/%s and %s', result['workdir'], known_answer.VALIDATION_JSON,
           known_answer.VALIDATION_MD)
  if not result['passed']:
    sys.stderr.write(f'validation failed: {", ".join(result["failed"])} (details in '
                     f'{result["workdir"]}/{known_answer.VALIDATION_MD})\n')
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  sys.exit(cli.run(main))
