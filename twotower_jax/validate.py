"""Known-answer validation of the class test: python -m twotower_jax.validate --workdir=DIR
[--config=configs/planted.py] [--config.x=y ...] [--ladder=1,0.9,0.75,0.6,0.5]
[--tower_types=causal,mlm] [--replicates=20] [--gate_steps=300] [--alpha=0.05] [--max_fpr=0.1]

On the planted language: a graded ladder of composed models whose towers were trained with
class weights w / 1 - w (the AUC must rise with w; w = 0.5 must report no split) and
replicated nulls (two seeds; a tower trained far longer than the other; shuffled towers:
the false-positive rate must stay at most --max_fpr). Writes DIR/validation.json,
validation.md and figures/ (twotower_jax/analysis/validation/; docs/ANALYSIS.md,
"Known-answer validation"). Exits 1 naming the failed checks of the primary
estimator (the others are reported as secondary); rerunning with the same DIR
resumes.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

from twotower_jax import cli
from twotower_jax import errors

_CONFIG = cli.define_config(config_flags.DEFINE_config_file, 'config', 'configs/planted.py',
                            'A planted-language config (get_config()).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs and the results.')
_GATE_STEPS = flags.DEFINE_integer('gate_steps', 300, 'Steps of training of the composed '
                                   'models (the one-tower runs train config.train.steps).')
_LADDER = flags.DEFINE_list('ladder', ['1', '0.9', '0.75', '0.6', '0.5'],
                            'Class weights w of the ladder\'s rungs (0.5 among them).')
_TOWER_TYPES = flags.DEFINE_list('tower_types', ['causal', 'mlm'], 'Tower types of the ladder.')
_PIECES = flags.DEFINE_float('pieces_rung', 0.9, 'w of the rung with SentencePiece pieces '
                             'instead of whole words (causal, gate); 0 = none.')
_PIECES_VOCAB = flags.DEFINE_integer('pieces_vocab', 0, 'SentencePiece vocabulary of that rung '
                                     '(0: a third of the word count).')
_REPLICATES = flags.DEFINE_integer('replicates', 20, 'Replicates of each null (own corpus '
                                   'and seeds each).')
_SHORT = flags.DEFINE_integer('short_steps', 0, 'Steps of the quality null\'s weaker tower '
                              '(0: train.steps // 6).')
_ALPHA = flags.DEFINE_float('alpha', 0.05, 'Level of the class test.')
_MAX_FPR = flags.DEFINE_float('max_fpr', 0.10, 'Largest false-positive rate a null may show.')


def _floats(name: str, values: list[str]) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise errors.UserError(f'--{name}={",".join(values)}: give numbers, e.g. '
                           '--ladder=1,0.75,0.5') from None


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --config.train.steps=300')
  from twotower_jax.analysis import validation  # pylint: disable=g-import-not-at-top
  from twotower_jax.model import towers  # pylint: disable=g-import-not-at-top
  unknown = [t for t in _TOWER_TYPES.value if t not in towers.TOWER_TYPES]
  if unknown or not _TOWER_TYPES.value:
    raise errors.UserError(f'--tower_types={",".join(_TOWER_TYPES.value)}: use registered '
                           f'tower types, e.g. causal,mlm (known: {sorted(towers.TOWER_TYPES)})')
  settings = validation.Settings(
      gate_steps=_GATE_STEPS.value, ladder=_floats('ladder', _LADDER.value),
      tower_types=tuple(_TOWER_TYPES.value), pieces_rung=_PIECES.value,
      pieces_vocab=_PIECES_VOCAB.value,
      replicates=_REPLICATES.value, short_steps=_SHORT.value, alpha=_ALPHA.value,
      max_fpr=_MAX_FPR.value)
  result = validation.run(cli.load_config(_CONFIG), _WORKDIR.value, settings)
  log = logging.getLogger('twotower_jax')
  for c in result['checks']:
    log.info('validate: %-16s %-28s %s', validation.writeup.verdict(c), c['name'], c['why'])
  log.info('validate: wrote %s/%s and %s', result['workdir'], validation.VALIDATION_JSON,
           validation.VALIDATION_MD)
  if not result['passed']:
    sys.stderr.write(f'validation failed: {", ".join(result["failed"])} (details in '
                     f'{result["workdir"]}/{validation.VALIDATION_MD})\n')
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  sys.exit(cli.run(main))
