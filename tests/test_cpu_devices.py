"""One XLA:CPU device per core (twotower_jax/cpu_devices.py): the count, what it leaves alone,
and that the training entry point starts with it."""

import os
import subprocess
import sys

from conftest import REPO, cli_overrides, run_module
from twotower_jax import config as config_lib
from twotower_jax import cpu_devices


def _config(**overrides):
  c = config_lib.base_config()
  config_lib.set_fields(c, overrides)
  return c


def test_count_is_the_most_devices_up_to_the_cores_that_divide_every_batch():
  assert cpu_devices.count([_config(**{'train.batch_size': 16})], cores=2) == 2
  assert cpu_devices.count([_config(**{'train.batch_size': 16})], cores=6) == 4
  assert cpu_devices.count([_config(**{'train.batch_size': 15})], cores=2) == 1
  assert cpu_devices.count([_config(**{'train.batch_size': 12}),
                            _config(**{'train.batch_size': 18})], cores=8) == 6
  # Gradient accumulation splits the batch first; each part splits over the devices.
  assert cpu_devices.count([_config(**{'train.batch_size': 16,
                                       'train.grad_accum_steps': 8})], cores=4) == 2
  assert cpu_devices.count([_config(**{'train.batch_size': 16})], cores=1) == 1


def test_count_leaves_a_chosen_mesh_and_a_bad_batch_to_the_user():
  assert cpu_devices.count([_config(**{'mesh.tower': 2})], cores=2) is None
  assert cpu_devices.count([_config(**{'mesh.data': 2})], cores=2) is None
  assert cpu_devices.count([_config(**{'train.batch_size': 0})], cores=2) is None
  assert cpu_devices.count([_config(**{'train.batch_size': 10,
                                       'train.grad_accum_steps': 4})], cores=2) is None
  assert cpu_devices.count([], cores=2) is None


def test_a_device_count_the_user_set_is_kept():
  assert cpu_devices.chosen({'JAX_NUM_CPU_DEVICES': '1'}) == 'JAX_NUM_CPU_DEVICES'
  assert cpu_devices.chosen({'XLA_FLAGS': '--xla_cpu_foo=1 '
                             '--xla_force_host_platform_device_count=8'}) is not None
  assert cpu_devices.chosen({'XLA_FLAGS': '--xla_cpu_foo=1'}) is None
  assert cpu_devices.chosen({}) is None


def _env_without_a_device_count():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _train(config, workdir, env):
  """python -m twotower_jax.main on `config` (as command-line overrides) in `env`."""
  return run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                    *cli_overrides(config), env=env)


def _devices_after_use(env, **overrides) -> str:
  code = ('import jax; from twotower_jax import config, cpu_devices\n'
          'c = config.base_config(); config.set_fields(c, %r)\n'
          'print(cpu_devices.use([c], cores=4), jax.device_count())' % overrides)
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=120, check=True)
  return proc.stdout.split()


def test_use_starts_jax_with_that_many_cpu_devices():
  env = _env_without_a_device_count()
  assert _devices_after_use(env, **{'train.batch_size': 16}) == ['4', '4']
  assert _devices_after_use(env, **{'mesh.tower': 2}) == ['None', '1']
  assert _devices_after_use({**env, 'JAX_NUM_CPU_DEVICES': '1'}) == ['None', '1']


def test_training_starts_with_one_device_per_core(tiny, tmp_path):
  """python -m twotower_jax.main without a device setting: the batch over the usable cores."""
  config = tiny(**{'mesh.tower': 1, 'train.steps': 1, 'train.eval_every': 1,
                   'train.checkpoint_every': 1, 'train.eval_batches': 1})
  proc = _train(config, tmp_path / 'run', _env_without_a_device_count())
  assert proc.returncode == 0, proc.stderr[-3000:]
  n = cpu_devices.count([config], cpu_devices.usable_cores())
  if n > 1:
    assert f'XLA:CPU: {n} devices, one per core' in proc.stderr
  else:  # a one-core machine: nothing to split
    assert 'XLA:CPU:' not in proc.stderr


def test_wait_behind_keeps_at_most_limit_results_in_flight():
  waited = []

  class Result:  # what jax.block_until_ready sees: an object with block_until_ready()
    def __init__(self, i):
      self.i = i

    def block_until_ready(self):
      waited.append(self.i)
      return self

  results = []
  for i in range(6):
    results.append(Result(i))
    cpu_devices.wait_behind(results, limit=2)
  assert waited == [0, 1, 2, 3]


def test_back_to_back_steps_on_two_cpu_devices_do_not_hang():
  """The bench harness's 300 steps without a sync: with every step queued, XLA:CPU's
  in-process all-reduce hung (at 40 queued, not at 24); it keeps cpu_devices.IN_FLIGHT."""
  code = ('import sys; sys.path.insert(0, "bench"); import harness\n'
          'c = harness.load_config("configs/tiny.py"); c.model.dropout = 0.0\n'
          'harness.StepBench(c, c.data.vocab_size).run(300); print("done")')
  env = {**_env_without_a_device_count(), 'JAX_NUM_CPU_DEVICES': '2'}
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and 'done' in proc.stdout, proc.stderr[-1500:]


def test_a_long_run_between_logs_on_two_cpu_devices(tiny, tmp_path):
  """120 steps between two syncs of the training loop, on two in-process CPU devices."""
  config = tiny(**{'mesh.tower': 1, 'model.dropout': 0.0, 'train.steps': 120,
                   'model.d_model': 128, 'model.d_mlp': 512, 'data.seq_len': 64,
                   'model.max_len': 64, 'train.batch_size': 16,
                   'train.log_every': 120, 'train.eval_every': 120,
                   'train.checkpoint_every': 120, 'train.eval_batches': 1})
  proc = _train(config, tmp_path / 'run',
                {**_env_without_a_device_count(), 'JAX_NUM_CPU_DEVICES': '2'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'step 120/120' in proc.stderr
