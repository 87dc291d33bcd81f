"""Prepare data: python -m twotower_jax.prepare --config=configs/X.py --out=DIR [--workers=N
--sample_mb=M] [--config.data.x=v].

Trains the tokenizer on the first --sample_mb MB of training text, then tokenises every
document with --workers processes and writes the packed windows as shards with a manifest
(data/shards.py) to DIR, a folder or gs://BUCKET/PATH. Train from them with
--config.data.prepared=DIR (the same data.seq_len, vocab_size and tokenizer_type). Rerun the
same command after an interruption: it continues where it stopped. See docs/SCALING.md.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from twotower_jax import cli
from twotower_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config()); its '
                                          'data section says what to prepare.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (local or gs://BUCKET/PATH).')
_WORKERS = flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Tokenising processes.')
_SAMPLE_MB = flags.DEFINE_float('sample_mb', 100.0, 'Training text the tokenizer learns from '
                                '(MB, from the first training documents).')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
                           'flag, e.g. --workers=8')
  if not _OUT.value:
    raise errors.UserError('--out=DIR is required: a new folder (or gs:// URL), or the --out '
                           'of an interrupted preparation to finish it')
  if _WORKERS.value < 1 or _SAMPLE_MB.value <= 0:
    raise errors.UserError(f'--workers={_WORKERS.value} must be >= 1 and --sample_mb='
                           f'{_SAMPLE_MB.value} > 0')
  from twotower_jax.data import preparation  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  config = cli.load_config(_CONFIG)
  setup_lib.check_config(config)
  manifest = preparation.prepare(config, _OUT.value, _WORKERS.value, _SAMPLE_MB.value)
  train, val = manifest['splits']['train'], manifest['splits']['val']
  print(f'prepared {_OUT.value}: {train["windows"]:,} training and {val["windows"]:,} held-out '
        f'windows of {manifest["seq_len"]} tokens ({train["tokens"] + val["tokens"]:,} tokens); '
        f'{manifest["seconds_this_run"]}s ({manifest["tokenizer_seconds_this_run"]}s tokenizer), '
        f'{manifest["text_mb_per_s_this_run"]} MB/s of text ({manifest["encode_mb_per_s_this_run"]} '
        'MB/s tokenising and packing)', flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  sys.exit(cli.run(main, config_files=('config',)))
