"""The main job end to end: CLI run, workdir contents, metrics, resume equals uninterrupted."""

import json
import os
import shutil

import numpy as np

from conftest import cli_overrides, run_module, snapshot
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import loop as train


def test_main_job_trains_checkpoints_and_logs(tiny, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny()
  proc = run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                    *cli_overrides(config))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'results in' in proc.stderr and 'eta' in proc.stderr
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'metrics.jsonl',
                                         'tensorboard', 'tokenizer.model']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['train']['steps'] == 6 and saved['data']['vocab_size'] == 256

  lines = workdir_lib.read_metrics(workdir)
  train_lines = [l for l in lines if l['kind'] == 'train']
  assert [l['step'] for l in train_lines] == [1, 2, 3, 4, 5, 6]
  for l in train_lines:
    assert {'step', 'loss', 'lr', 'tokens_per_s'} <= set(l) and np.isfinite(l['loss'])
  evals = [l for l in lines if l['kind'] == 'eval']
  assert [l['step'] for l in evals] == [3, 6]
  assert np.isclose(evals[-1]['perplexity'], np.exp(evals[-1]['loss']))
  baseline = [l for l in lines if l['kind'] == 'baseline'][0]
  assert baseline['unigram_perplexity'] > 1

  # Rerunning a finished run resumes at its last step and changes nothing.
  before = snapshot(os.path.join(workdir, 'checkpoints'))
  proc = run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                    *cli_overrides(config))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed' in proc.stderr
  assert snapshot(os.path.join(workdir, 'checkpoints')) == before


def test_resumed_run_continues_exactly(tiny, tmp_path):
  """Steps 4-6 after a restart at step 3 give the losses of an uninterrupted run."""
  whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
  train.train_and_evaluate(tiny(), whole)
  train.train_and_evaluate(tiny(**{'train.steps': 3}), parts)
  shutil.rmtree(os.path.join(parts, 'tensorboard'))
  result = train.train_and_evaluate(tiny(), parts)
  assert result['step'] == 6

  def losses(workdir):
    lines = workdir_lib.read_metrics(workdir)
    return {l['step']: l['loss'] for l in lines if l['kind'] == 'train'}

  a, b = losses(whole), losses(parts)
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    assert a[step] == b[step], (step, a[step], b[step])
  evals = [l for l in workdir_lib.read_metrics(parts)
           if l['kind'] == 'eval']
  assert [l['step'] for l in evals] == [3, 6]
