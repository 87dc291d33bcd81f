"""Launch scripts: valid bash; the TPU VM dry run prints the expected gcloud commands."""

import glob
import hashlib
import os
import subprocess
import sys

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
  full.update({'PREFLIGHT': '0', **env})
  r = subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_vm.sh'), '--dry-run', *args],
                     capture_output=True, text=True, env=full, cwd=REPO)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_tpu_dry_run_prints_the_gcloud_commands():
  env = {'TPU_NAME': 'tt', 'ZONE': 'us-east5-a', 'PROJECT': 'proj', 'ACCELERATOR_TYPE': 'v4-32',
         'RUNTIME_VERSION': 'tpu-ubuntu2204-base', 'REPO_URL': 'https://example.com/t.git',
         'BRANCH': 'dev', 'WORKDIR': 'gs://bkt/runs/a', 'SPOT': '1', 'GCSFUSE': '1'}
  out = _dry('create', **env)
  assert out.startswith('gcloud compute tpus tpu-vm create tt --zone=us-east5-a --project=proj '
                        '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot')
  out = _dry('setup', **env)
  assert out.startswith('gcloud compute tpus tpu-vm ssh tt --zone=us-east5-a --project=proj '
                        '--worker=all')
  for piece in ('git clone -q https://example.com/t.git twotower_jax', 'checkout -q dev',
                'gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt ~/gcs/bkt',
                'source launch/env.sh', 'jax[tpu]=='):
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


@pytest.mark.parametrize('accelerator, image', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')])
def test_tpu_image_follows_the_accelerator_type(accelerator, image):
  out = _dry('create', TPU_NAME='tt', ACCELERATOR_TYPE=accelerator)
  assert out.strip() == ('gcloud compute tpus tpu-vm create tt --zone=us-central2-b '
                         f'--accelerator-type={accelerator} --version={image}')
  out = _dry('create', TPU_NAME='tt', ACCELERATOR_TYPE=accelerator, RUNTIME_VERSION='my-image')
  assert out.strip().endswith('--version=my-image')  # overridable


def test_tpu_queued_resources_keep_spot_and_delete_the_vm():
  env = {'TPU_NAME': 'tt', 'ACCELERATOR_TYPE': 'v6e-16', 'QUEUED': '1', 'SPOT': '1'}
  prefix = 'gcloud compute tpus queued-resources '
  assert _dry('create', **env).strip() == (
      prefix + 'create tt-qr --zone=us-central2-b --node-id=tt --accelerator-type=v6e-16 '
      '--runtime-version=v2-alpha-tpuv6e --spot')
  assert _dry('status', **env).strip() == prefix + 'describe tt-qr --zone=us-central2-b'
  assert _dry('delete', **env, QUEUED_ID='q1').strip() == (
      prefix + 'delete q1 --zone=us-central2-b --force --quiet')


def test_tpu_gs_workdir_is_used_directly_and_prepare_runs_on_worker_0():
  env = {'TPU_NAME': 'tt', 'WORKDIR': 'gs://bkt/runs/a'}
  out = _dry('train', **env)
  assert '--workdir=gs://bkt/runs/a' in out and 'gcsfuse' not in out
  assert 'gcsfuse' not in _dry('setup', **env, REPO_URL='https://example.com/t.git')
  out = _dry('prepare', 'gs://bkt/data/lm1b', '--workers=8', **env)
  assert '--worker=0' in out
  assert ('python -m twotower_jax.prepare --config=configs/tpu_pod.py --out=gs://bkt/data/lm1b '
          '--workers=8') in out


def _pinned_venv_env() -> dict:
  """The environment to run a launcher's local python step with this test's venv, which
  launch/env.sh accepts only as the pinned one (else it would install one)."""
  with open(os.path.join(REPO, 'requirements.lock'), 'rb') as a, open(
      os.path.join(REPO, 'setup.py'), 'rb') as b:
    stamp = hashlib.sha256(a.read() + b.read()).hexdigest()
  try:
    with open(os.path.join(sys.prefix, '.installed')) as f:
      pinned = f.read().strip() == stamp
  except OSError:
    pinned = False
  if not pinned:
    pytest.skip("this test's venv is not launch/env.sh's pinned venv")
  return {'TWOTOWER_VENV': sys.prefix, 'TWOTOWER_HUGE_PAGES': '0'}


def test_tpu_dry_run_train_runs_the_cpu_preflight():
  out = _dry('train', '--config.model.n_layers=1', PREFLIGHT='1', TPU_NAME='tt',
             ACCELERATOR_TYPE='v5litepod-8', CONFIG='configs/tiny.py', DRY_RUN_MFU='0.3',
             **_pinned_venv_env())
  assert out.startswith('gcloud compute tpus tpu-vm ssh tt')
  for piece in ('# pre-flight of configs/tiny.py on v5litepod-8',
                'dry run for v5litepod-8 (8 tpu devices)', '2 x causal towers, 1 layers',
                'lowered for tpu (jax.export): ok', 'expected step time at MFU 0.30'):
    assert piece in out, (piece, out)


def test_gpu_script_dry_run_needs_no_gpu():
  env = {**os.environ, **_pinned_venv_env(), 'CONFIG': 'configs/tiny.py', 'GPU_TARGET': 'H100'}
  r = subprocess.run(['bash', os.path.join(REPO, 'launch', 'gpu.sh'), '--dry-run',
                      '--config.model.dtype=bfloat16'], capture_output=True, text=True, env=env,
                     cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'dry run for H100 (1 cuda device)' in r.stdout and 'of 80 GiB' in r.stdout
  assert 'attention: cudnn' in r.stdout


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
