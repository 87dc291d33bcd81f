"""gs:// workdirs end to end, against a Cloud Storage emulator on the loopback interface.

Train to a checkpoint, kill -9, resume: the final state is bit-identical to an
uninterrupted local run; then analyse and generate, every file in the bucket.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

from tests import _gcs
from tests.conftest import REPO, cli_overrides, run_module, tiny_config
from twotower_jax import paths
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import loop as train
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import setup as setup_lib
from twotower_jax.train import sharding as sharding_lib
from twotower_jax.train import state as state_lib

STEPS = 24


@pytest.fixture(scope='module')
def bucket():
  """gs://bkt/<fresh prefix> on an emulator this module started; the process's environment
  points gcsfs and TensorStore at it for the module's tests and the commands they run."""
  with _gcs.emulator() as url:
    env = _gcs.environment(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
      yield f'gs://{_gcs.BUCKET}/{uuid.uuid4().hex[:8]}'
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


def _state(config, workdir, step):
  """The whole train state of checkpoint `step`, on one device."""
  setup = setup_lib.build(config, workdir, train_tokenizer=False, devices=jax.devices()[:1])
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(setup.model, tx, setup.mesh, sharding_lib.rules(config))
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    state, _ = checkpoints.restore(mngr, step, state_lib.abstract(setup.model, tx, state_sh))
  finally:
    mngr.close()
  return state


@pytest.mark.slow
def test_gs_workdir_trains_survives_kill9_resumes_bit_identically_analyses_generates(
    bucket, small_corpus_dir, tmp_path):
  config = tiny_config(small_corpus_dir, **{
      'train.steps': STEPS, 'train.checkpoint_every': 3, 'train.eval_every': 12,
      'mesh.tower': 1})
  local = str(tmp_path / 'local')
  train.train_and_evaluate(config.copy_and_resolve_references(), local)

  workdir = f'{bucket}/run'
  args = [sys.executable, '-m', 'twotower_jax.main', '--config=configs/default.py',
          f'--workdir={workdir}', *cli_overrides(config)]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 1200  # a busy 2-core CI machine
  while not checkpoints.complete_steps(workdir) and proc.poll() is None:
    assert time.monotonic() < deadline, 'no checkpoint reached the bucket'
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  killed_at = checkpoints.complete_steps(workdir)[-1]
  assert killed_at < STEPS

  resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'at step {killed_at}' in resumed.stderr, resumed.stderr[-3000:]  # 'resumed from ...'
  steps = [l['step'] for l in workdir_lib.read_metrics(workdir) if l['kind'] == 'train']
  assert steps == list(range(1, STEPS + 1))  # the redone steps once each
  for a, b in zip(jax.tree.leaves(_state(config, local, STEPS)),
                  jax.tree.leaves(_state(config, workdir, STEPS))):
    a, b = np.atleast_1d(jax.device_get(a)), np.atleast_1d(jax.device_get(b))
    assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
  events = paths.listdir(workdir_lib.path(workdir, workdir_lib.TENSORBOARD))
  assert len(events) == 2  # one event file per run, the second purging the redone steps

  analysed = run_module('twotower_jax.analyze', f'--workdir={workdir}',
                        f'--steps={STEPS - 3},{STEPS}', '--config.analysis.estimators=probe',
                        '--config.analysis.eval_windows=4', '--config.analysis.probe_windows=8',
                        '--config.analysis.probe_steps=5', '--config.analysis.n_boot=10',
                        '--config.analysis.n_control=5', timeout=1200)
  assert analysed.returncode == 0, analysed.stderr[-3000:]
  analysis = workdir_lib.analysis_dir(workdir)
  for step in (STEPS - 3, STEPS):  # each step's own analysis, then the report over both
    out = paths.join(analysis, workdir_lib.STEPS_DIR, str(step))
    assert json.loads(paths.read_bytes(paths.join(out, workdir_lib.SUMMARY_JSON)))['step'] == step
    assert workdir_lib.REPORT_MD in paths.listdir(out)
  over = workdir_lib.read_json(paths.join(analysis, workdir_lib.OVER_TRAINING_JSON))
  assert [row['step'] for row in over['steps']] == [STEPS - 3, STEPS]

  generated = run_module('twotower_jax.generate', f'--workdir={workdir}',
                         '--prompt=Fellow citizens', '--max_new_tokens=4', '--mean_windows=2',
                         timeout=1200)
  assert generated.returncode == 0, generated.stderr[-3000:]
  records = workdir_lib.read_jsonl(
      paths.join(workdir_lib.generate_dir(workdir), workdir_lib.GENERATIONS_JSONL))
  assert len(records) == 1 and records[0]['step'] == STEPS



@pytest.mark.slow
def test_data_prepared_into_a_bucket_trains_as_its_local_copy(bucket, small_corpus_dir,
                                                              tmp_path):
  from twotower_jax.data import preparation  # pylint: disable=g-import-not-at-top
  config = tiny_config(small_corpus_dir, **{'train.steps': 3, 'train.checkpoint_every': 3,
                                            'train.eval_every': 3, 'mesh.tower': 1})
  remote, local = f'{bucket}/data', str(tmp_path / 'data')
  manifest = preparation.prepare(config, remote, workers=2)
  assert manifest['complete'] and manifest['splits']['train']['windows'] > 0
  paths.copy_tree(remote, local)
  losses = []
  for prepared, workdir in ((remote, f'{bucket}/from_bucket'), (local, str(tmp_path / 'run'))):
    run = config.copy_and_resolve_references()
    run.data.prepared = prepared
    train.train_and_evaluate(run, workdir)
    losses.append([l['loss'] for l in workdir_lib.read_metrics(workdir)
                   if l['kind'] in ('train', 'eval')])
  assert losses[0] == losses[1]
