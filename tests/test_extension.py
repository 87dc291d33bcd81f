"""Extending the project: a tower type, a gate, an estimator and a data source, each one file
(tests/toy_parts/) that registers itself when `config.imports` names it, train and analyse end
to end with no other edit."""

import os
import sys

import pytest

from conftest import run_module
from twotower_jax import config as config_lib
from twotower_jax import preference_table
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import estimators
from twotower_jax.data import corpus
from twotower_jax.model import gates
from twotower_jax.model import towers
from twotower_jax.train import loop
from twotower_jax.train import setup

PARTS = {'tests.toy_parts.bigram_tower': (towers.TOWER_TYPES, 'toy_bigram'),
         'tests.toy_parts.mean_gate': (gates.GATES, 'toy_mean'),
         'tests.toy_parts.zero_ablation': (estimators.ESTIMATORS, 'toy_zero'),
         'tests.toy_parts.counting_source': (corpus.SOURCES, 'toy_counting')}


@pytest.fixture
def toy_parts():
  """Unregisters the parts afterwards (other tests list the registered names)."""
  yield ','.join(PARTS)
  for module, (registry, name) in PARTS.items():
    registry.pop(name, None)
    sys.modules.pop(module, None)


def test_toy_parts_train_and_analyse(toy_parts, tmp_path):
  c = config_lib.base_config()
  c.imports = toy_parts
  c.data.source = 'toy_counting'
  c.data.tokenizer_type = 'word'
  c.data.vocab_size = 18  # 5 specials, [MASK] and one piece per word
  c.data.val_fraction = 0.2
  c.data.seq_len = c.model.max_len = 16
  c.model.tower_type, c.model.gate = 'toy_bigram', 'toy_mean'
  c.model.d_model, c.model.n_heads, c.model.d_mlp = 16, 2, 32
  c.train.steps, c.train.batch_size = 4, 4
  c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 2
  c.mesh.tower = 2
  c.analysis.estimators = 'toy_zero,ablation'
  c.analysis.min_count = 1
  c.analysis.n_boot = 10
  workdir = str(tmp_path / 'run')
  result = loop.train_and_evaluate(c, workdir)
  assert result['step'] == 4 and result['eval']['loss'] > 0

  # A fresh process: only config.json's `imports` brings the parts back.
  proc = run_module('twotower_jax.analyze', f'--workdir={workdir}',
                    '--config.analysis.estimators=toy_zero,ablation',
                    '--config.analysis.min_count=1', '--config.analysis.n_boot=10')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = workdir_lib.analysis_dir(workdir)
  summary = workdir_lib.read_json(os.path.join(out, workdir_lib.SUMMARY_JSON))
  assert summary['tower_type'] == 'toy_bigram' and summary['gate'] == 'toy_mean'
  assert summary['estimators'] == ['toy_zero', 'ablation']
  assert 'set to zero' in summary['per_estimator']['toy_zero']['description']
  assert summary['per_estimator']['toy_zero']['n_items'] > 5
  cols = preference_table.read_preferences(os.path.join(out, workdir_lib.PREFERENCE_CSV))
  assert cols['_estimators'] == {'toy_zero': 2, 'ablation': 2}
  with open(os.path.join(out, workdir_lib.REPORT_MD)) as f:
    report = f.read()
  assert '## Estimator `toy_zero`' in report and 'set to zero' in report
  assert summary['agreement']['toy_zero~ablation']['n'] > 5


def test_toy_source_checks_its_own_fields(toy_parts):
  c = config_lib.base_config()
  c.imports = toy_parts
  c.data.source = 'toy_counting'
  with pytest.raises(config_lib.ConfigError, match='toy_counting supports'):
    setup.check_config(c)
  c.imports = 'tests.toy_parts.nope'
  with pytest.raises(config_lib.ConfigError, match="cannot import 'tests.toy_parts.nope'"):
    setup.check_config(c)
