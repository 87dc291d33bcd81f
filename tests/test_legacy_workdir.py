"""A workdir written before the package redesign (aff3a11, tests/data/) restores, analyses to
the same numbers, and resumes training."""

import json
import os
import shutil

import numpy as np

from conftest import REPO, run_module
from twotower_jax import preference_table
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import loop

LEGACY = os.path.join(REPO, 'tests', 'data', 'workdir_aff3a11')
with open(LEGACY + '.expected.json') as f:
  EXPECTED = json.load(f)


def test_old_workdir_analyses_to_the_same_values(tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(LEGACY, workdir)
  # The old version let an ablation's replacement reach the latent gate's prior: 'edited'.
  proc = run_module('twotower_jax.analyze', f'--workdir={workdir}', *EXPECTED['analyze_flags'],
                    '--config.analysis.ablation_routing=edited')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = workdir_lib.analysis_dir(workdir)
  summary = workdir_lib.read_json(os.path.join(out, workdir_lib.SUMMARY_JSON))
  assert summary['step'] == EXPECTED['step'] and summary['n_positions'] == EXPECTED['n_positions']
  assert summary['eval_loss'] == EXPECTED['eval_loss']
  cols = preference_table.read_preferences(os.path.join(out, workdir_lib.PREFERENCE_CSV))
  np.testing.assert_array_equal(cols['count'], EXPECTED['count'])
  for name in ('ablation_t0', 'ablation_t1', 'gate_t0', 'gate_t1'):
    want = np.array([np.nan if v is None else v for v in EXPECTED[name]])
    # The estimators now read cached tower states (a different jitted graph): float32
    # rounding moves the 6-digit CSV values by at most a few 1e-7.
    np.testing.assert_allclose(cols[name], want, rtol=0, atol=2e-6, err_msg=name)


def test_old_workdir_resumes_training(tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(LEGACY, workdir)
  config = workdir_lib.read_config(workdir)
  config.train.steps = 6
  config.mesh.data, config.mesh.tower = 4, 2  # the batch of 4 on this machine's 8 devices
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == 6 and np.isfinite(result['eval']['loss'])
  steps = [l['step'] for l in workdir_lib.read_metrics(workdir) if l['kind'] == 'train']
  assert steps == [2, 4, 6]  # resumed at 4: the old lines kept, new ones appended
