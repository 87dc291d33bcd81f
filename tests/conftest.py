"""Test setup: 8 fake CPU devices (set before JAX is imported) and tiny configs."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import glob  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util
import shutil
import subprocess
import sys
import types

import pytest

from twotower_jax import config as config_lib
from twotower_jax.data import sotu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
# A few speeches of different eras: enough text for a 256-piece tokenizer.
SMALL_SPEECHES = ('1790-Washington-1', '1821-Monroe-1', '1862-Lincoln-1', '1901-Roosevelt-1',
                  '1934-Roosevelt-1', '1962-Kennedy-1', '1985-Reagan-1', '2010-Obama-1')


@pytest.fixture(scope='session')
def small_corpus_dir(tmp_path_factory):
  """Eight State of the Union speeches as plain text files (data.source=text)."""
  out = tmp_path_factory.mktemp('small_corpus')
  speeches = sotu.sotu_speech_dir()
  for name in SMALL_SPEECHES:
    shutil.copy(os.path.join(speeches, name + '.txt'), out / (name + '.txt'))
  return str(out)


def tiny_config(text_dir: str, **overrides):
  """A model small enough to compile and train in seconds on CPU."""
  c = config_lib.base_config()
  c.data.source = 'text'
  c.data.text_glob = os.path.join(text_dir, '*.txt')
  c.data.val_fraction = 0.25
  c.data.vocab_size = 256
  c.data.seq_len = 32
  c.model.n_layers = 2
  c.model.d_model = 32
  c.model.n_heads = 2
  c.model.d_mlp = 64
  c.model.max_len = 32
  c.model.dropout = 0.1
  c.train.steps = 6
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
  c.optimizer.warmup_steps = 2
  c.mesh.tower = 2
  config_lib.set_fields(c, overrides)
  return c


# A cuDNN 9 version number (9.8) for lowering on CPU; JAX reads it only to gate features
# (compute capability 10.3, multi-head latent attention) this model does not use.
CUDNN_VERSION = 90800


@pytest.fixture
def cudnn_lowering(monkeypatch):
  """Lets cuDNN attention be traced (and so lowered for cuda) on a machine without the
  CUDA plugin: JAX asks the plugin for cuDNN's version while tracing; nothing else."""
  # pylint: disable-next=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as fused
  if fused.cuda_versions is None:
    monkeypatch.setattr(fused, 'cuda_versions',
                        types.SimpleNamespace(cudnn_get_version=lambda: CUDNN_VERSION))


@pytest.fixture
def tiny(small_corpus_dir):
  return lambda **overrides: tiny_config(small_corpus_dir, **overrides)


def file_config(name: str = 'default'):
  """get_config() of configs/NAME.py (default.py: the file the CLI tests pass)."""
  spec = importlib.util.spec_from_file_location(f'{name}_config',
                                                os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope='module')
def two_step_run(small_corpus_dir, tmp_path_factory):
  """A finished two-step run (config, workdir) for tests that read or damage it in copies."""
  from twotower_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = tiny_config(small_corpus_dir, **{'train.steps': 2, 'train.checkpoint_every': 2,
                                            'train.eval_every': 2})
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  loop.train_and_evaluate(config, workdir)
  return config, workdir


def _leaves(tree: dict, prefix: str = ''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def cli_overrides(config, base=None) -> list[str]:
  """--config.A.B=VALUE for every leaf (nested sections included) that differs from `base`
  (default: configs/default.py, the file the CLI tests pass): what a user would type."""
  base_leaves = dict(_leaves(config_lib.to_dict(base or file_config())))
  out = []
  for key, value in _leaves(config_lib.to_dict(config)):
    if base_leaves.get(key, object()) != value:
      if isinstance(value, list):  # tuples (e.g. sharding.rules) in Python syntax
        value = repr(_as_tuple(value))
      out.append(f'--config.{key}={value}')
  return out


def _as_tuple(value):
  return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def run_module(module: str, *args: str, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m module args` from the repo root, as a user would (in `env`, default
  this process's environment)."""
  env = dict(os.environ if env is None else env)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def one_device_env() -> dict:
  """This process's environment with one CPU device instead of the 8 fake ones: for
  subprocess runs that test no sharding (8 devices on 2 cores make tiny steps ~3x slower)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  return dict(os.environ, XLA_FLAGS=' '.join([*flags, '--xla_force_host_platform_device_count=1']))


def snapshot(path: str) -> dict:
  """{relative path: (size, mtime)} of every file under `path`."""
  out = {}
  for f in glob.glob(os.path.join(path, '**'), recursive=True):
    if os.path.isfile(f):
      st = os.stat(f)
      out[os.path.relpath(f, path)] = (st.st_size, st.st_mtime_ns)
  return out
