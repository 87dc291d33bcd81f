"""Command-line config overrides and their errors: one line, exit 2, workdir untouched."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_module, snapshot


def _main(workdir, *args):
  return run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                    *args, timeout=120)


@pytest.mark.parametrize('args, message', [
    (['--config.train.stepz=3'], 'unknown config field'),
    (['--config.train.steps=many'], 'bad config override'),
    (['--config.model.n_heads=3'], 'model.n_heads=3 does not divide'),
    (['--config.data.seq_len=512'], 'exceeds model.max_len'),
    (['--config.data.seq_len=0'], 'data.seq_len=0 must be >= 1'),
    (['--config.model.n_towers=3', '--config.mesh.tower=2'], 'does not divide model.n_towers'),
    (['--config.data.source=wiki'], "data.source='wiki' is unknown"),
    (['stray'], 'unexpected arguments'),
    # Round 3 (docs/RELIABILITY.md): these were tracebacks, or a stray quote.
    (['--config.train.stepz=3'], 'unknown config field stepz (from --config.train.stepz); did '
                                 'you mean train.steps? every field'),
    (["--config.model={'n_towers': 3}"], "--config.model={...} replaces the whole model "
                                         'section (every other field would be lost)'),
    (['--config.train.steps=3000000000'], 'train.steps=3000000000 is too large: at most 2**31'),
    (['--config.model.scan_unroll=0'], 'model.scan_unroll=0 must be an integer >= 1'),
])
def test_bad_config_is_one_line_and_leaves_the_workdir_alone(tmp_path, args, message):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('keep me')
  before = snapshot(str(workdir))
  proc = _main(str(workdir), *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
  assert snapshot(str(workdir)) == before


def test_missing_config_file_is_one_line(tmp_path):
  proc = run_module('twotower_jax.main', '--config=configs/nope.py',
                    f'--workdir={tmp_path}', timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'cannot load config' in lines[0], lines


def test_a_workdir_with_another_model_is_refused(tiny, tmp_path):
  from twotower_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  workdir.mkdir()
  old = tiny()
  workdir_lib.write_config(old, str(workdir))
  before = snapshot(str(workdir))
  proc = _main(str(workdir), '--config.model.d_model=64')
  assert proc.returncode == 2
  assert 'model.d_model: 256 -> 64' not in proc.stderr  # compares to the saved run, not defaults
  assert 'different config' in proc.stderr and 'new --workdir' in proc.stderr
  assert snapshot(str(workdir)) == before
  assert os.listdir(workdir) == ['config.json']


def test_cli_overrides_are_one_per_leaf_and_parse_back(tiny, tmp_path):
  """The tests' override helper: nested sections become one --config.a.b.c=v per leaf, and
  main parses them back into the same config (bools, floats, strings, nested fields)."""
  from conftest import cli_overrides, file_config  # pylint: disable=g-import-not-at-top
  config = tiny(**{'model.embedding.tied': False, 'model.embedding.input_grad_scale': 2.5,
                   'model.pondering.steps': 1, 'model.gate': 'latent'})
  flags = cli_overrides(config)
  assert '--config.model.embedding.tied=False' in flags
  assert '--config.model.embedding.input_grad_scale=2.5' in flags
  assert '--config.model.pondering.steps=1' in flags
  assert not [f for f in flags if f.startswith('--config.model.embedding=')]
  assert cli_overrides(file_config()) == []
  code = ('import json, sys; from absl import flags; from ml_collections import config_flags; '
          'from twotower_jax import config; c = config_flags.DEFINE_config_file("config"); '
          'flags.FLAGS(sys.argv); print(json.dumps(config.to_dict(c.value)))')
  proc = subprocess.run([sys.executable, '-c', code, '--config=configs/default.py', *flags],
                        cwd=REPO, capture_output=True, text=True, check=True)
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert json.loads(proc.stdout) == config_lib.to_dict(config)
