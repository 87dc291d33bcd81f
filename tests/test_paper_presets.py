"""The paper presets (configs/paper.py:TYPE,SIZE): the original's schedule, data and
precision values; every preset trains a few steps on CPU at reduced size; a missing dataset
is a one-line error; the dry run's tokens, steps and wall time agree with each other.

The original's numbers are from hezq06/twotower_lm at e8b468e (docs/FIDELITY.md, A5).
"""

import importlib.util
import os
import re

import numpy as np
import pytest

from conftest import REPO
from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.model import towers
from twotower_jax.train import dryrun
from twotower_jax.train import loop as train
from twotower_jax.train import optimizer as optimizer_lib
from twotower_jax.train import setup as setup_lib

PRESETS = [f'{t},{s}' for t in towers.TOWER_TYPES for s in ('base', 'large')]

# The original's phase-1 run: deepspeed_config_24hbert.json:2-4 (5120 = micro-batch 128 x 10
# accumulation x 4 data-parallel processes), run_2towerlm.sh:7-8 (window 128, 25 epochs,
# --warm_up_steps 10000), TwoTowerLM.py:16 (5,000 micro-batches per epoch), model.py:780
# (30,528 outputs).
ORIGINAL_MICRO_STEPS = 25 * 5000
ORIGINAL_ACCUM = 10
ORIGINAL_WARMUP_MICRO = 10_000


def _preset(arg):
  spec = importlib.util.spec_from_file_location('paper_config',
                                                os.path.join(REPO, 'configs', 'paper.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _original_lr(step, lr=1e-3):
  """The original's lr at optimizer step `step` (0-based), from dslearn.py:177-184: set at
  each accumulation boundary from the index of that step's last micro-batch."""
  micro = step * ORIGINAL_ACCUM + ORIGINAL_ACCUM - 1
  if micro < ORIGINAL_WARMUP_MICRO:
    return micro / ORIGINAL_WARMUP_MICRO * lr
  return (1 - (micro - ORIGINAL_WARMUP_MICRO) / (ORIGINAL_MICRO_STEPS - ORIGINAL_WARMUP_MICRO)) * lr


@pytest.mark.parametrize('arg', PRESETS)
def test_preset_has_the_original_schedule_vocabulary_and_window(arg):
  c = _preset(arg)
  setup_lib.check_config(c)
  t = c.train
  assert (t.batch_size, t.grad_accum_steps) == (5120, ORIGINAL_ACCUM)
  assert t.batch_size // t.grad_accum_steps == 128 * 4  # the original's micro-batch x 4 GPUs
  assert c.data.seq_len == c.model.max_len == 128
  assert t.steps == ORIGINAL_MICRO_STEPS // ORIGINAL_ACCUM == 12_500
  assert c.optimizer.warmup_steps == ORIGINAL_WARMUP_MICRO // ORIGINAL_ACCUM == 1_000
  assert c.data.vocab_size == 30_528 and c.model.dtype == 'bfloat16'
  o = c.optimizer
  assert (o.lr, o.b1, o.b2, o.weight_decay, o.clip_norm) == (1e-3, 0.9, 0.98, 0.01, 1.0)
  assert c.data.source == 'tfds' and c.data.tfds_name.startswith('wikipedia/')


@pytest.mark.parametrize('arg', PRESETS)
def test_preset_probes_read_what_the_originals_probes_read(arg):
  """docs/FIDELITY.md A4: slice k of the head's joint LN, dropout on, a seed per probe."""
  c = _preset(arg)
  a = c.analysis
  assert (a.probe_input, a.probe_dropout, a.probe_seed_per_tower) == ('joint_ln', True, True)
  assert c.model.gate == 'concat'
  c.model.gate = 'latent'  # a gate without the joint LN is refused, naming the fix
  c.model.head.width = 'model'  # (the table-wide head of mlm/bilstm needs concat itself,
  c.model.head.joint_ln_dropout = False  # and so does ELMo's dropout after the joint LN)
  with pytest.raises(config_lib.ConfigError, match='analysis.probe_input=tower'):
    setup_lib.check_config(c)
  c.analysis.probe_input = 'tower'
  setup_lib.check_config(c)


def _field(c, key):
  node = c
  for name in key.split('.'):
    node = node[name]
  return node


ORIGINAL_PARTS = {  # docs/FIDELITY.md B1-B4, B6, per tower type
    'causal': {'model.embedding.ln': 'none', 'model.head.width': 'model',
               'model.ln_final': True, 'model.embedding.positions': True,
               'model.head.joint_ln_dropout': False},
    'mlm': {'model.embedding.ln': 'shared', 'model.head.width': 'table',
            'model.ln_final': False, 'model.embedding.positions': True,
            'model.bilstm.hidden': 0, 'model.head.joint_ln_dropout': False},
    'bilstm': {'model.embedding.ln': 'per_direction', 'model.head.width': 'table',
               'model.ln_final': False, 'model.embedding.positions': False,
               'model.bilstm.residual': False, 'model.bilstm.join': False,
               'model.n_layers': 2, 'model.d_model': 256, 'model.bilstm.input_shift': True,
               'model.head.joint_ln_dropout': True},
}


@pytest.mark.parametrize('arg', PRESETS)
def test_preset_has_the_original_architecture_switches(arg):
  tower_type, size = arg.split(',')
  c = _preset(arg)
  for key, value in ORIGINAL_PARTS[tower_type].items():
    assert _field(c, key) == value, key
  if tower_type == 'bilstm':
    assert c.model.bilstm.hidden == {'base': 2048, 'large': 4096}[size]
  else:
    assert (c.model.n_layers, c.model.d_model) == {'base': (12, 384), 'large': (24, 512)}[size]


def test_preset_lr_schedule_follows_the_original_to_within_one_step():
  """Warm-up to the peak at step 1,000, linear decay to zero at 12,500: the original's
  micro-batch-indexed schedule sampled at its boundaries lies 0.9 steps ahead of ours."""
  c = _preset('causal,base')
  schedule = optimizer_lib.schedule(c)
  steps = np.array([0, 1, 500, 999, 1000, 1001, 5000, 12_000, 12_499])
  ours = np.array([float(schedule(s)) for s in steps])
  original = np.array([_original_lr(s) for s in steps])
  np.testing.assert_allclose(ours, original, atol=1e-3 / 1000)  # one warm-up step of lr
  assert float(schedule(1000)) == pytest.approx(1e-3) and float(schedule(12_500)) == 0.0


def _reduced(arg, text_dir, **extra):
  """The preset with its structure, head, precision and accumulation kept, at CPU size:
  small widths and vocabulary, 4 steps, the test corpus instead of Wikipedia."""
  c = _preset(arg)
  config_lib.set_fields(c, {
      'data.source': 'text', 'data.text_glob': os.path.join(text_dir, '*.txt'),
      'data.val_fraction': 0.25, 'data.vocab_size': 256, 'data.seq_len': 32,
      'model.max_len': 32, 'model.n_layers': 2, 'model.d_model': 32, 'model.n_heads': 2,
      'model.d_mlp': 128, 'train.batch_size': 40, 'train.steps': 4, 'train.log_every': 1,
      'train.eval_every': 4, 'train.eval_batches': 1, 'train.checkpoint_every': 4,
      'optimizer.warmup_steps': 1, 'mesh.tower': 2, **extra})
  if c.model.bilstm.hidden:  # the original ELMo's 2048/4096-wide LSTMs, at CPU size
    c.model.bilstm.hidden = 64
  return c


@pytest.mark.slow  # 20-55 s each on a shared 2-core CPU: tokenizer, compile, eval, checkpoint
@pytest.mark.parametrize('arg', PRESETS)
def test_every_paper_preset_trains_a_few_steps_at_reduced_size(arg, small_corpus_dir, tmp_path):
  c = _reduced(arg, small_corpus_dir)
  assert c.train.grad_accum_steps == 10 and c.model.dtype == 'bfloat16'
  sizes = ('model.n_layers', 'model.d_model', 'model.n_heads', 'model.bilstm.hidden')
  for key, value in towers.get(c.model.tower_type).paper_fields(arg.split(',')[1]).items():
    if key not in sizes:  # the original's parts stay on at the reduced size (B1-B4)
      assert _field(c, key) == value, key
  result = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert result['step'] == 4
  assert np.isfinite(result['eval']['loss'])
  assert result['eval']['loss'] < np.log(256) + 1.0  # a distribution over 256 pieces
  # The preset's probes (joint LN slice, dropout on, a seed per head) on the trained run.
  from twotower_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  config = runner.load_config(workdir, analysis_overrides={
      'analysis.estimators': 'probe', 'analysis.eval_windows': 2, 'analysis.probe_windows': 8,
      'analysis.probe_steps': 2, 'analysis.probe_eval_every': 1, 'analysis.min_count': 1,
      'analysis.n_boot': 10, 'analysis.n_control': 5})
  assert config.analysis.probe_input == 'joint_ln' and config.analysis.probe_dropout
  summary = runner.run(config, workdir)
  assert summary['per_estimator']['probe']['n_items'] > 0


def test_missing_dataset_is_a_one_line_error(tmp_path):
  c = _preset('causal,base')
  c.data.tfds_data_dir = str(tmp_path / 'no_tfds_here')
  with pytest.raises(corpus_lib.CorpusError) as e:
    corpus_lib.load(c.data)
  message = str(e.value)
  assert '\n' not in message and 'wikipedia/20230601.en' in message
  assert 'is not prepared' in message


def _number(text, pattern):
  return float(re.search(pattern, text).group(1).replace(',', ''))


def test_dry_run_prints_tokens_steps_and_wall_time_that_agree(small_corpus_dir):
  """A paper preset's dry run (reduced width, the preset's batch, window and steps): tokens =
  steps x batch x window, wall time = steps x step time, as printed."""
  c = _reduced('causal,base', small_corpus_dir,
               **{'train.batch_size': 5120, 'train.steps': 12_500, 'data.seq_len': 128,
                  'model.max_len': 128, 'model.n_layers': 1, 'mesh.tower': 1})
  r = dryrun.run(c, dryrun.target('v5e-8'), mfu=0.45)
  text = dryrun.format_report(r, c)
  per_step = _number(text, r'run: ([\d,]+) tokens/step')
  steps = _number(text, r'x ([\d,]+) steps')
  total = _number(text, r'steps = ([\d,]+) tokens')
  step_ms = _number(text, r'expected step time at MFU 0.45: ([\d,.]+) ms')
  wall_s = _number(text, r'h \(([\d,]+) s\)')
  assert per_step == 5120 * 128 and steps == 12_500
  assert total == steps * 5120 * 128 == 8_192_000_000
  # Printed to 0.1 ms per step and to 1 s in all: equal within those roundings.
  assert abs(wall_s - steps * step_ms / 1e3) <= 0.5 + steps * 0.05e-3
  assert wall_s == round(r['wall_s']) and r['wall_s'] == pytest.approx(steps * r['step_s'])
  assert r['wall_s'] == pytest.approx(r['flops_per_step'] / (0.45 * 197e12 * 8) * steps)
