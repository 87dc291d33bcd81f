"""Launch scripts: valid bash; the TPU VM dry run prints the expected gcloud commands."""

import glob
import os
import subprocess

import pytest

from tests.conftest import REPO
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import sharding as sharding_lib

SCRIPTS = sorted(glob.glob(os.path.join(REPO, 'launch', '*.sh')))


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_scripts_parse(script):
  assert subprocess.run(['bash', '-n', script], capture_output=True).returncode == 0


def _dry(*args, **env):
  full = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'ZONE', 'PROJECT'))}
  full.update(env)
  r = subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_vm.sh'), '--dry-run', *args],
                     capture_output=True, text=True, env=full, cwd=REPO)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_tpu_dry_run_prints_the_gcloud_commands():
  env = {'TPU_NAME': 'tt', 'ZONE': 'us-east5-a', 'PROJECT': 'proj', 'ACCELERATOR_TYPE': 'v4-32',
         'RUNTIME_VERSION': 'tpu-ubuntu2204-base', 'REPO_URL': 'https://example.com/t.git',
         'BRANCH': 'dev', 'WORKDIR': 'gs://bkt/runs/a', 'SPOT': '1'}
  out = _dry('create', **env)
  assert out.startswith('gcloud compute tpus tpu-vm create tt --zone=us-east5-a --project=proj '
                        '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot')
  out = _dry('setup', **env)
  assert out.startswith('gcloud compute tpus tpu-vm ssh tt --zone=us-east5-a --project=proj '
                        '--worker=all')
  for piece in ('git clone -q https://example.com/t.git twotower_jax', 'checkout -q dev',
                'gcsfuse --implicit-dirs bkt ~/gcs/bkt', 'source launch/env.sh', 'jax[tpu]=='):
    assert piece in out, piece
  out = _dry('train', '--config.train.steps=7', **env)
  assert '--worker=all' in out
  assert ('python -m twotower_jax.main --config=configs/tpu_pod.py '
          '--workdir=$HOME/gcs/bkt/runs/a --config.train.steps=7') in out
  out = _dry('analyze', **env)
  assert '--worker=0' in out
  assert 'python -m twotower_jax.analyze --workdir=$HOME/gcs/bkt/runs/a' in out
  prefix = 'gcloud compute tpus tpu-vm '
  assert _dry('ssh', **env).strip() == prefix + 'ssh tt --zone=us-east5-a --project=proj --worker=0'
  assert _dry('delete', **env).strip() == prefix + 'delete tt --zone=us-east5-a --project=proj --quiet'
  # Single host, local workdir, defaults: no project flag, no gcsfuse.
  out = _dry('train', TPU_NAME='one', CONFIG='configs/default.py')
  assert '--workdir=runs/one' in out and 'gcsfuse' not in out and '--project' not in out


def test_tpu_script_rejects_unknown_commands():
  r = subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_vm.sh'), 'launch-rockets'],
                     capture_output=True, text=True)
  assert r.returncode == 2 and 'unknown command' in r.stderr


@pytest.mark.parametrize('name,devices', [('tpu_pod', 16), ('gpu', 1)])
def test_presets_validate_and_fit_their_hardware(name, devices):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  setup_lib.check_config(config)
  shape = sharding_lib.mesh_shape(config.mesh, devices)
  assert config.train.batch_size % (shape[0] * shape[1]) == 0
  assert config.model.dtype == 'bfloat16'
