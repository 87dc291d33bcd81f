"""Two processes on localhost (gloo CPU collectives, 4 fake devices each) train like one.

Same global batch, same (data=4, tower=2) mesh over 8 devices: the losses agree
within float tolerance, and the checkpoint the two processes wrote restores in one.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO, cli_overrides, tiny_config
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import checkpoints
from twotower_jax import config as config_lib
from twotower_jax.model import lm as model_lib
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.train import state as state_lib


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, config, n_devices, extra=()):
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n_devices}'
  cmd = [sys.executable, '-m', 'twotower_jax.main', '--config=configs/default.py',
         f'--workdir={workdir}', *cli_overrides(config), *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _train_losses(workdir):
  return [l['loss'] for l in workdir_lib.read_metrics(workdir)
          if l['kind'] == 'train']


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoint_restores_in_one(small_corpus_dir, tmp_path):
  config = tiny_config(small_corpus_dir, **{'mesh.data': 4, 'mesh.tower': 2, 'train.steps': 4,
                                            'train.eval_every': 4, 'train.checkpoint_every': 4})
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  port = _free_port()
  procs = [_launch(two, config, 4, [f'--coordinator_address=localhost:{port}',
                                    '--num_processes=2', f'--process_id={i}'])
           for i in range(2)]
  single = _launch(one, config, 8)
  outs = [p.communicate(timeout=600)[0] for p in procs + [single]]
  for p, out in zip(procs + [single], outs):
    assert p.returncode == 0, out[-3000:]
  assert 'distributed: process 0 of 2, 4 local / 8 global devices' in outs[0]
  assert 'preflight: train step compiled' in outs[0]

  # Only process 0 wrote metrics; every train line of the 2-process run matches.
  losses_one, losses_two = _train_losses(one), _train_losses(two)
  assert len(losses_one) == len(losses_two) == 4
  np.testing.assert_allclose(losses_two, losses_one, rtol=2e-5)
  run_line = [l for l in workdir_lib.read_metrics(two)
              if l['kind'] == 'run'][0]
  assert run_line['devices'] == 8 and run_line['flops_per_step'] > 0
  assert run_line['compile_s'] > 0

  # The checkpoint written by both processes restores in this one process.
  mesh = sharding_lib.make_mesh(config)
  rules = sharding_lib.rules(config)
  sp = tokenizer_lib.load(os.path.join(two, workdir_lib.TOKENIZER))
  model = model_lib.build(config, sp.get_piece_size())
  tx = optimizer_lib.make(config)
  abstract = state_lib.abstract(model, tx, state_lib.shardings(model, tx, mesh, rules))
  restored = {}
  for name, workdir in (('one', one), ('two', two)):
    mngr = checkpoints.manager(workdir, read_only=True)
    assert mngr.latest_step() == 4
    restored[name], _ = checkpoints.restore(mngr, 4, abstract)
    mngr.close()
  assert int(restored['two'].step) == 4
  for a, b in zip(jax.tree.leaves(restored['one'].params),
                  jax.tree.leaves(restored['two'].params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_distributed_settings_and_errors(monkeypatch):
  from twotower_jax.train import distributed  # pylint: disable=g-import-not-at-top
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
            'TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE', 'CLOUD_TPU_TASK_ID'):
    monkeypatch.delenv(k, raising=False)
  assert distributed.settings() == ('', 0, -1)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'h:1')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert distributed.settings() == ('h:1', 4, 3)
  assert distributed.settings('g:2', 2, 0) == ('g:2', 2, 0)  # flags win over env
  with pytest.raises(distributed.DistributedError, match='process_id'):
    distributed.initialize('auto', 'g:2', 2, 5)
  with pytest.raises(distributed.DistributedError, match='unknown'):
    distributed.initialize('sometimes')
  assert distributed.initialize('off') is False  # off ignores the env entirely
  assert distributed.initialize('auto', 'g:2', 1, 0) is False  # one process: nothing to join
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(k)
  if not distributed.on_cloud_tpu_vm():
    assert distributed.initialize('auto') is False  # a plain single-process run


def test_process_rows_follow_the_batch_sharding(tiny):
  config = tiny(**{'mesh.data': 4, 'mesh.tower': 2})
  mesh = sharding_lib.make_mesh(config)
  sh = sharding_lib.batch_sharding(mesh, sharding_lib.rules(config))
  assert sharding_lib.process_rows(sh, 8) == (0, 8)  # one process holds every row
  bad = tiny(**{'train.grad_accum_steps': 4, 'mesh.data': 4, 'mesh.tower': 2})
  with pytest.raises(config_lib.ConfigError, match='grad_accum_steps'):
    sharding_lib.make_mesh(bad)
