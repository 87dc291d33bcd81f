"""python -m twotower_jax.validate end to end at its CPU-test size (slow).

`configs/planted.py:test`: the planted language with 160 documents, 4 topics x 12 content
words, window 32; towers of 1 layer with d=32, 3000 steps (about 20 s each on the one CPU
device these runs get: they test the estimators, not sharding); here a
two-rung ladder (w = 1, 0.5) of causal towers, the SentencePiece rung (w = 1, 38 pieces, the
most this corpus supports) and one replicate of the nulls; 60 steps of composed training.
Besides the machinery, the primary estimator's verdicts are asserted: the known answer at
w = 1 found, none at w = 0.5, neither null model of the replicate called a split. The
false-positive rates themselves need the 20 replicates of the published run
(docs/ANALYSIS.md).
"""

import json
import os

import numpy as np
import pytest

from conftest import one_device_env
from conftest import run_module
from twotower_jax import run as run_lib
from twotower_jax.train import optimizer as optimizer_lib

pytestmark = pytest.mark.slow

SMALL = ('--config=configs/planted.py:test', '--gate_steps=60', '--ladder=1,0.5',
         '--tower_types=causal', '--replicates=1', '--pieces_rung=1', '--pieces_vocab=38')
COMPOSED = ['ladder/causal/w1.00/gate', 'ladder/causal/w1.00/joint', 'ladder/causal/w0.50/gate',
            'ladder/causal/w0.50/joint', 'ladder/pieces/w1.00/gate', 'nulls/r00/seeds',
            'nulls/r00/quality']


def _params(wd):
  restored = run_lib.restore(run_lib.load_config(wd), wd)
  import jax  # pylint: disable=import-outside-toplevel
  return {optimizer_lib.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(restored.params)[0]}


@pytest.fixture(scope='module')
def validated(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('validate'))
  proc = run_module('twotower_jax.validate', f'--workdir={wd}', *SMALL, timeout=3000,
                    env=one_device_env())
  with open(os.path.join(wd, 'validation.json')) as f:
    return wd, proc, json.load(f)


def test_checks_files_and_exit_status(validated):
  wd, proc, result = validated
  names = {c['name'] for c in result['checks']}
  for est in ('ablation', 'gate', 'probe', 'resample'):
    assert f'ladder/causal/gate/{est}' in names and f'ladder/pieces/gate/{est}' in names
    assert {f'null/{n}/{est}' for n in ('seeds', 'quality', 'shuffled')} <= names
  assert 'ladder/causal/joint/gate' not in names  # concat: no gate estimator
  assert {'ladder/causal/joint/probe', 'ladder/causal/joint/resample'} <= names
  by_name = {c['name']: c for c in result['checks']}
  assert by_name['null/shuffled/probe']['n'] == 2 * 5  # 2 null models x 5 shuffled draws
  # The known answer at w = 1 is found by every estimator of the frozen composition.
  for est in ('ablation', 'gate', 'probe', 'resample'):
    top = by_name[f'ladder/causal/gate/{est}']['rungs'][0]
    assert top['w'] == 1.0 and top['auc'] >= 0.9 and top['split'], (est, top)
  # The primary estimator (resample) is the one required: its verdicts at this size.
  assert result['primary'] == 'resample/planted'
  for name in ('ladder/causal/gate/resample', 'ladder/causal/joint/resample',
               'ladder/pieces/gate/resample', 'null/seeds/resample', 'null/quality/resample',
               'null/shuffled/resample'):
    assert by_name[name]['required'] and by_name[name]['passed'], by_name[name]
  bottom = by_name['ladder/causal/gate/resample']['rungs'][-1]
  assert bottom['w'] == 0.5 and not bottom['split'], bottom
  assert not any(c['required'] for c in result['checks'] if not c['name'].endswith('resample'))
  assert result['failed'] == [] and result['passed'], result['failed']
  assert proc.returncode == 0, proc.stderr[-2000:]  # every required check passes
  assert result['secondary_failed'] == [
      c['name'] for c in result['checks'] if not c['required'] and not c['passed']]
  text = open(os.path.join(wd, 'validation.md')).read()
  assert '| causal/gate | gate | 1: ' in text and '| seeds | probe |' in text
  for fig in ('ladder', 'calibration'):
    assert os.path.getsize(os.path.join(wd, 'figures', f'{fig}.png')) > 1000


def test_composed_models_hold_their_sources_towers(validated):
  wd = validated[0]
  gate, joint = (_params(os.path.join(wd, f'ladder/causal/w1.00/{m}')) for m in ('gate', 'joint'))
  src = [_params(os.path.join(wd, f'ladder/causal/w1.00/src{k}')) for k in (0, 1)]
  per_tower = [p for p in gate if p.startswith(('towers/', 'gate/heads/', 'embed/token',
                                                'embed/position'))]
  assert len(per_tower) > 10
  for p in per_tower:  # copied at init, then frozen through gate training
    for k in (0, 1):
      np.testing.assert_array_equal(gate[p][k], src[k][p][0], err_msg=p)
  assert np.any(gate['gate/gate/kernel'])  # the prior learnt to route
  moved = [p for p in per_tower if p in joint and p.startswith('towers/')
           and not np.array_equal(joint[p][0], src[0][p][0])]
  assert moved  # the joint composition trains its towers
  null = _params(os.path.join(wd, 'nulls/r00/quality'))
  short, a = (_params(os.path.join(wd, f'nulls/r00/{s}')) for s in ('short', 'a'))
  for p in per_tower:
    np.testing.assert_array_equal(null[p][0], a[p][0], err_msg=p)
    np.testing.assert_array_equal(null[p][1], short[p][0], err_msg=p)


def test_class_weights_split_the_eval_targets(validated):
  runs = validated[2]['runs']
  syntax, topic = (runs[f'ladder/causal/w1.00/src{k}']['eval'] for k in (0, 1))
  half = runs['ladder/causal/w0.50/src0']['eval']
  # weights (1, 0) and (0, 1) count only their class; (0.5, 0.5) half of every classed target
  assert syntax['tokens'] + topic['tokens'] == pytest.approx(2 * half['tokens'], rel=1e-6)
  assert syntax['loss'] < syntax['loss_all'] and topic['loss'] < topic['loss_all']
  assert runs['nulls/r00/short']['step'] == 500  # 3000 // 6


def test_rerun_resumes_without_training_again(validated):
  wd, _, first = validated
  proc = run_module('twotower_jax.validate', f'--workdir={wd}', *SMALL, timeout=1200,
                    env=one_device_env())
  n_runs = len(first['runs'])
  assert proc.stderr.count('is trained') == n_runs
  assert proc.stderr.count('is analysed, kept') == len(COMPOSED)
  with open(os.path.join(wd, 'validation.json')) as f:
    again = json.load(f)
  assert again['checks'] == first['checks']
  assert again['runs']['nulls/r00/seeds']['train_wall_s'] == (
      first['runs']['nulls/r00/seeds']['train_wall_s'])
