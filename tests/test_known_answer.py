"""The validation's plan and verdicts (fast): the five runs' configs, the checks, bad input.
The end-to-end run is tests/test_validate.py (slow)."""

import math
import os

import pytest

from conftest import file_config, run_module
from twotower_jax import config as config_lib
from twotower_jax.analysis import known_answer
from twotower_jax.train import setup as setup_lib


def test_run_configs_compose_the_known_and_null_models(tmp_path):
  configs = known_answer.run_configs(file_config('planted'), str(tmp_path), gate_steps=40)
  assert list(configs) == ['syntax', 'topic', 'all', 'known', 'null']
  for name, loss_class in (('syntax', 'syntax'), ('topic', 'topic'), ('all', '')):
    c = configs[name]
    assert (c.model.n_towers, c.data.planted_loss_class, c.train.steps) == (1, loss_class, 900)
    assert not c.model.init_towers and not c.train.trainable
  for name, src in (('known', ('syntax', 'topic')), ('null', ('all', 'all'))):
    c = configs[name]
    assert c.model.n_towers == 2 and c.model.dropout == 0.0 and c.train.steps == 40
    assert c.model.init_towers == ','.join(f'{tmp_path}/{s}:0' for s in src)
    assert c.train.trainable == known_answer.TRAINABLE and c.train.checkpoint_every == 40
  for c in configs.values():
    assert (c.model.gate, c.model.embedding.mode, c.model.latent.uniform_init) == (
        'latent', 'per_tower', True)
    setup_lib.check_config(c)


@pytest.mark.parametrize('field,value,match', [
    ('data.source', 'sotu', 'needs the planted language'),
    ('data.planted_loss_class', 'syntax', 'sets data.planted_loss_class'),
    ('train.trainable', '^gate/', 'sets data.planted_loss_class'),
])
def test_run_configs_refuse_what_they_cannot_use(tmp_path, field, value, match):
  c = file_config('planted')
  config_lib.set_fields(c, {field: value})
  with pytest.raises(known_answer.ValidationError, match=match):
    known_answer.run_configs(c, str(tmp_path), 10)


def _planted_block(auc, lo, hi, p, centre):
  return {'auc': auc, 'ci': [lo, hi], 'n_syntax': 32, 'n_topic': 29,
          'null': {'p': p, 'null_mean': centre}}


def test_judge_known_needs_the_auc():
  ok = known_answer.judge('known', 'probe', _planted_block(0.97, 0.9, 1.0, 0.01, 0.5), 0.95, 0.05)
  low = known_answer.judge('known', 'probe', _planted_block(0.9, 0.8, 1.0, 0.01, 0.5), 0.95, 0.05)
  wrong_way = known_answer.judge('known', 'gate', _planted_block(0.02, 0.0, 0.1, 0.01, 0.5),
                                 0.95, 0.05)  # syntax leaning to tower 1 is a failure
  assert ok['passed'] and not low['passed'] and not wrong_way['passed']
  missing = known_answer.judge('known', 'gate', None, 0.95, 0.05)
  assert not missing['passed'] and 'not analysed' in missing['why']


def test_judge_null_reports_a_split_only_beyond_the_control():
  block = _planted_block
  assert known_answer.judge('null', 'probe', block(0.55, 0.4, 0.7, 0.4, 0.5), 0.95, 0.05)['passed']
  # significant but the interval still holds the control's mean: no split
  assert known_answer.judge('null', 'probe', block(0.6, 0.45, 0.75, 0.01, 0.5), 0.95,
                            0.05)['passed']
  split = known_answer.judge('null', 'probe', block(0.8, 0.7, 0.9, 0.01, 0.5), 0.95, 0.05)
  assert not split['passed'] and 'excludes' in split['why']
  # exactly symmetric models: every preference 0, AUC 0.5, p = 1
  assert known_answer.judge('null', 'gate', block(0.5, 0.5, 0.5, 1.0, 0.5), 0.95, 0.05)['passed']
  undefined = known_answer.judge('null', 'gate', block(0.8, 0.7, 0.9, math.nan, math.nan), 0.95,
                                 0.05)
  assert not undefined['passed']


def test_markdown_names_the_failures():
  result = {'passed': False, 'failed': ['known/ablation'], 'min_auc': 0.95, 'alpha': 0.05,
            'checks': [dict(known_answer.judge('known', 'ablation',
                                               _planted_block(0.6, 0.5, 0.7, 0.02, 0.5),
                                               0.95, 0.05))],
            'runs': {'syntax': {'step': 900, 'eval': {'loss': 1.9, 'loss_all': 4.0},
                                'train_wall_s': 10.0, 'train_cpu_s': 9.0}}}
  text = known_answer.markdown(result)
  assert 'FAILED: known/ablation' in text and '| known | ablation | 0.600 [0.500, 0.700]' in text
  assert '| syntax | 900 | 1.900 | 4.000 | 10 / 9 |' in text


def test_validate_command_refuses_a_non_planted_config(tmp_path):
  proc = run_module('twotower_jax.validate', f'--workdir={tmp_path}/v',
                    '--config=configs/default.py')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: validate needs the planted')
  assert not os.path.exists(tmp_path / 'v')
