"""Reliability: kill -9 and SIGTERM resume bit-identically, non-finite stop/skip, restores
onto other meshes bit-equal, mismatched trees refused, uncommitted steps never chosen."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, cli_overrides, tiny_config
from twotower_jax.train import setup as setup_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import nonfinite
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import loop as train
from twotower_jax.train import state as state_lib
from twotower_jax.train import step as step_lib


def restored_state(config, workdir, devices=None, step=None, mesh_config=None):
  """The checkpointed state of `workdir` restored onto a mesh of `devices` (default: all)."""
  setup = setup_lib.build(config, workdir, train_tokenizer=False)
  mesh = sharding_lib.make_mesh(mesh_config or config, devices)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(setup.model, tx, mesh, sharding_lib.rules(config))
  mngr = checkpoints.manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  state, _ = checkpoints.restore(mngr, step, state_lib.abstract(setup.model, tx, state_sh))
  mngr.close()
  return state


def assert_bit_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for path, x, y in zip(checkpoints.leaf_paths(a), leaves_a, leaves_b):
    x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)), path


# --- kill -9 and SIGTERM -------------------------------------------------------------

KILL_STEPS = 8


def kill_config(corpus_dir):
  return tiny_config(corpus_dir, **{'train.steps': KILL_STEPS, 'train.checkpoint_every': 1,
                                    'train.eval_every': 4})


def start_training(config, workdir) -> subprocess.Popen:
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.Popen(
      [sys.executable, '-m', 'twotower_jax.main', '--config=configs/default.py',
       f'--workdir={workdir}', *cli_overrides(config)],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def trained_steps(workdir) -> int:
  return max([l['step'] for l in workdir_lib.read_metrics(workdir) if l['kind'] == 'train'],
             default=0)


def wait_for(proc, condition, timeout=300.0):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.005)
  raise TimeoutError('training subprocess made no progress')


@pytest.fixture(scope='module')
def uninterrupted(small_corpus_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('whole') / 'run')
  config = kill_config(small_corpus_dir)
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_resumes_bit_identically(uninterrupted, tmp_path):
  """kill -9 twice while Orbax writes a step; the resumed run ends bit-identical."""
  config, whole = uninterrupted
  workdir = str(tmp_path / 'killed')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  killed_in_write = 0
  for min_step in (2, 5):
    proc = start_training(config, workdir)

    def writing():
      return (trained_steps(workdir) >= min_step and
              bool(glob.glob(os.path.join(ckpt_dir, '*.orbax-checkpoint-tmp*'))))
    if wait_for(proc, writing):
      killed_in_write += 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
  assert killed_in_write >= 1  # at least one kill landed inside an async write
  assert trained_steps(workdir) < KILL_STEPS
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == KILL_STEPS
  assert not glob.glob(os.path.join(ckpt_dir, '*tmp*'))
  assert_bit_equal(restored_state(config, whole), restored_state(config, workdir))
  steps = [l['step'] for l in workdir_lib.read_metrics(workdir)
           if l['kind'] == 'train']
  assert steps == list(range(1, KILL_STEPS + 1))  # lines after the resumed step were redone


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_bit_identically(uninterrupted, tmp_path):
  config, whole = uninterrupted
  workdir = str(tmp_path / 'term')
  proc = start_training(config, workdir)
  assert wait_for(proc, lambda: trained_steps(workdir) >= 2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-2000:]
  assert 'stopped by SIGTERM at step' in stderr
  stopped = int(stderr.split('stopped by SIGTERM at step ')[1].split(';')[0])
  assert stopped < KILL_STEPS
  mngr = checkpoints.manager(workdir, read_only=True)
  assert mngr.latest_step() == stopped  # the step it finished was saved
  mngr.close()
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == KILL_STEPS
  assert_bit_equal(restored_state(config, whole), restored_state(config, workdir))


# --- non-finite ----------------------------------------------------------------------

def test_nonfinite_stop_names_step_and_keeps_last_good_checkpoint(tiny, tmp_path):
  workdir = str(tmp_path / 'nan')
  config = tiny(**{'optimizer.lr': 1e30, 'train.checkpoint_every': 1, 'train.log_every': 3})
  with pytest.raises(nonfinite.NonFiniteError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert 'is not finite' in message and 'on_nonfinite=skip' in message
  bad = int(message.split('step ')[1].split(':')[0])
  assert message.split(': ')[1].startswith(('loss', 'gradient of params['))
  mngr = checkpoints.manager(workdir, read_only=True)
  assert max(mngr.all_steps()) == bad - 1  # nothing saved at or after the bad step
  mngr.close()
  assert f'last good checkpoint is step {bad - 1}' in message
  state = restored_state(config, workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  lines = workdir_lib.read_metrics(workdir)
  assert [l['step'] for l in lines if l['kind'] == 'nonfinite'] == [bad]


def test_nonfinite_skip_keeps_params_and_counts(tiny, tmp_path):
  """With skip, a NaN step leaves params and optimizer state bit-identical, step + 1."""
  config = tiny(**{'train.on_nonfinite': 'skip'})
  setup = setup_lib.build(config, str(tmp_path), train_tokenizer=True)
  tx = optimizer_lib.make(config)
  state = state_lib.init(setup.model, tx, 0)
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[-1] = leaves[-1].at[0].set(np.nan)  # a NaN parameter: loss and gradients NaN
  state = state.replace(params=jax.tree.unflatten(treedef, leaves))
  rows = setup.splits.train_windows[:8]
  for mode in ('skip', 'stop'):
    new, metrics = jax.jit(lambda s, b, mode=mode: step_lib.train_step(
        s, b, model=setup.model, tx=tx, lr_schedule=optimizer_lib.schedule(config),
        on_nonfinite=mode))(state, rows)
    names = nonfinite.quantity_names(state.params)
    assert nonfinite.first_offender(metrics[nonfinite.FLAGS_KEY], names) == 'loss'
    assert int(new.step) == 1
    if mode == 'skip':
      assert float(metrics['skipped']) == 1.0
      for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                      jax.tree.leaves((new.params, new.opt_state))):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    else:
      assert float(metrics['skipped']) == 0.0


def test_first_offender_names_the_first_gradient_leaf():
  grads = {'a': np.ones(3, np.float32), 'b': {'c': np.array([1.0, np.inf], np.float32)},
           'd': np.array([np.nan], np.float32)}
  finite, flags_Q = nonfinite.flags(np.float32(2.0), grads)
  assert not bool(finite)
  assert nonfinite.first_offender(np.asarray(flags_Q), nonfinite.quantity_names(grads)) == (
      "gradient of params['b']['c']")
  finite, flags_Q = nonfinite.flags(np.float32(2.0), {'a': np.ones(2, np.float32)})
  assert bool(finite) and nonfinite.first_offender(np.asarray(flags_Q), ['loss', 'a']) is None


def test_nonfinite_skip_run_finishes_and_counts_skips(tiny, tmp_path):
  workdir = str(tmp_path / 'skip')
  config = tiny(**{'optimizer.lr': 1e30, 'train.on_nonfinite': 'skip', 'train.steps': 4,
                   'train.eval_every': 4, 'train.checkpoint_every': 4})
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 4
  lines = [l for l in workdir_lib.read_metrics(workdir)
           if l['kind'] == 'train']
  n_bad = sum(1 for l in lines if not np.isfinite(float(l['loss'])))
  assert n_bad >= 1 and sum(l['skipped'] for l in lines) >= n_bad
  state = restored_state(config, workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# --- restore onto other meshes -------------------------------------------------------

@pytest.fixture(scope='module')
def mesh_run(small_corpus_dir, tmp_path_factory):
  """Two steps trained on a (data=4, fsdp=2) mesh."""
  workdir = str(tmp_path_factory.mktemp('mesh') / 'run')
  config = tiny_config(small_corpus_dir, **{'train.steps': 2, 'train.checkpoint_every': 2,
                                            'train.eval_every': 2, 'mesh.data': 4,
                                            'mesh.fsdp': 2, 'mesh.tower': 1})
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_unfinished_saves_are_removed_before_a_writing_run_starts(tmp_path):
  """Orbax cleans tmp dirs in a background thread; ours is done when manager() returns."""
  root = tmp_path / 'checkpoints'
  for name in ('2', '4.orbax-checkpoint-tmp', '6.orbax-checkpoint-tmp-1732000000'):
    (root / name / 'state').mkdir(parents=True)
  checkpoints.manager(str(tmp_path), read_only=True).close()
  assert len(os.listdir(root)) == 3  # a reader never deletes
  removed = checkpoints.remove_interrupted_saves(str(tmp_path))
  assert [os.path.basename(p) for p in removed] == ['4.orbax-checkpoint-tmp',
                                                    '6.orbax-checkpoint-tmp-1732000000']
  assert os.listdir(root) == ['2']


def test_uncommitted_steps_are_never_chosen(mesh_run, tmp_path):
  """A tmp dir of an interrupted save and a step dir without Orbax's commit files are skipped."""
  config, whole = mesh_run
  last = 2
  workdir = str(tmp_path / 'copy')
  shutil.copytree(whole, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  shutil.copytree(os.path.join(ckpt_dir, str(last)),
                  os.path.join(ckpt_dir, f'{last + 2}.orbax-checkpoint-tmp'))
  half = os.path.join(ckpt_dir, str(last + 1))
  shutil.copytree(os.path.join(ckpt_dir, str(last)), half)
  os.remove(os.path.join(half, '_CHECKPOINT_METADATA'))
  mngr = checkpoints.manager(workdir, read_only=True)
  assert last + 1 in mngr.all_steps()  # Orbax alone would pick the half-written step
  assert checkpoints.latest_complete_step(mngr) == last
  mngr.close()
  mngr = checkpoints.manager(workdir)  # a writing run: cleans both up
  assert checkpoints.latest_complete_step(mngr, remove_incomplete=True) == last
  assert max(mngr.all_steps()) == last  # the manager forgot the removed step
  mngr.close()
  assert sorted(os.listdir(ckpt_dir), key=int)[-1] == str(last)


@pytest.mark.parametrize('data, fsdp, tower, n_devices', [
    (2, 4, 1, 8), (8, 1, 1, 8), (1, 1, 2, 2), (1, 1, 1, 1)])
def test_restore_onto_another_mesh_is_bit_equal(mesh_run, data, fsdp, tower, n_devices):
  config, workdir = mesh_run
  reference = restored_state(config, workdir)
  other = config.copy_and_resolve_references()
  other.mesh.data, other.mesh.fsdp, other.mesh.tower = data, fsdp, tower
  devices = jax.devices()[:n_devices]
  state = restored_state(config, workdir, devices, mesh_config=other)
  leaf = jax.tree.leaves(state.params)[0]
  assert set(leaf.sharding.device_set) <= set(devices)
  assert leaf.sharding.mesh.shape == {'data': data, 'fsdp': fsdp, 'tower': tower}
  assert_bit_equal(reference, state)


def test_mismatched_shape_or_structure_is_refused(mesh_run):
  config, workdir = mesh_run
  wider = config.copy_and_resolve_references()
  wider.model.d_model = 64
  with pytest.raises(checkpoints.CheckpointError, match='does not restore onto this model'):
    restored_state(wider, workdir)
  # A target tree missing a leaf: Orbax refuses instead of restoring the rest.
  setup = setup_lib.build(config, workdir, train_tokenizer=False)
  tx = optimizer_lib.make(config)
  mesh = sharding_lib.make_mesh(config)
  abstract = state_lib.abstract(setup.model, tx,
                                state_lib.shardings(setup.model, tx, mesh,
                                                    sharding_lib.rules(config)))
  params = dict(abstract.params)
  params.pop(sorted(params)[0])
  mngr = checkpoints.manager(workdir, read_only=True)
  with pytest.raises(checkpoints.CheckpointError, match='does not restore onto this model'):
    checkpoints.restore(mngr, mngr.latest_step(), abstract.replace(params=params))
  mngr.close()
