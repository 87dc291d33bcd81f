"""DIR/analysis holds the outputs of one step or none, --out writes them elsewhere (read-only
workdirs), too few items give n/a and a sentence, and a checkpoint deleted by a training run
while it is read is read again (docs/RELIABILITY.md, "The analysis")."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from _faults import read_only
from conftest import REPO, run_module, snapshot, tiny_config
from twotower_jax import run as run_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import runner
from twotower_jax.train import checkpoints
from twotower_jax.train import loop as train

FAST = {'analysis.estimators': 'probe,ablation', 'analysis.eval_windows': 16,
        'analysis.probe_steps': 5, 'analysis.probe_batch_size': 4, 'analysis.n_boot': 20,
        'analysis.min_count': 2}


@pytest.fixture(scope='module')
def trained(small_corpus_dir, tmp_path_factory):
  """Six steps, checkpoints 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_and_evaluate(tiny_config(small_corpus_dir), workdir)
  return workdir


@pytest.fixture
def copy(trained, tmp_path):
  out = str(tmp_path / 'run')
  shutil.copytree(trained, out)
  return out


def analysis_config(workdir, **overrides):
  config = runner.load_config(workdir)
  for key, value in {**FAST, **overrides}.items():
    config.analysis[key.split('.')[1]] = value
  return config


def summary_of(out_dir):
  return workdir_lib.read_json(os.path.join(out_dir, workdir_lib.SUMMARY_JSON))


def test_too_few_items_give_na_and_a_sentence_not_a_crash(copy):
  summary = runner.run(analysis_config(copy, **{'analysis.min_count': 10**6}), copy)
  est = summary['per_estimator']['ablation']
  assert est['n_items'] == 0 and est['frequency']['bins'] == []
  assert 'too few for these statistics' in est['note']
  with open(os.path.join(workdir_lib.analysis_dir(copy), workdir_lib.REPORT_MD)) as f:
    report = f.read()
  assert 'Only 0 item(s) reach `min_count` = 1000000, too few' in report and 'n/a' in report


def test_a_failed_reanalysis_leaves_the_previous_outputs_whole(copy, monkeypatch):
  out = workdir_lib.analysis_dir(copy)
  runner.run(analysis_config(copy, **{'analysis.step': 3}), copy)
  before = snapshot(out)
  assert summary_of(out)['step'] == 3

  def killed(_):
    raise RuntimeError('killed while writing the report')
  monkeypatch.setattr(runner.report, 'write_report', killed)
  with pytest.raises(RuntimeError, match='killed'):
    runner.run(analysis_config(copy, **{'analysis.step': 6}), copy)
  assert snapshot(out) == before  # step 3's outputs, every one unchanged
  assert not [n for n in os.listdir(copy) if n.startswith('.analysis.')]


def test_a_reanalysis_replaces_every_output_and_keeps_the_probe_cache(copy):
  out = workdir_lib.analysis_dir(copy)
  runner.run(analysis_config(copy, **{'analysis.step': 3}), copy)
  with open(os.path.join(out, 'stale.txt'), 'w') as f:
    f.write('an output of the step-3 analysis only')
  os.mkdir(os.path.join(copy, f'.analysis.tmp-{2**22 + 1}'))  # a killed analysis's staging
  runner.run(analysis_config(copy, **{'analysis.step': 6}), copy)
  assert summary_of(out)['step'] == 6
  assert not os.path.exists(os.path.join(out, 'stale.txt'))
  assert sorted(os.listdir(os.path.join(out, workdir_lib.PROBE_DIR))) == [
      'probe_step3.npz', 'probe_step6.npz']  # trained heads survive a re-analysis
  assert not [n for n in os.listdir(copy) if n.startswith('.analysis.')]


def test_out_analyses_a_read_only_workdir(copy, tmp_path):
  out = str(tmp_path / 'elsewhere')
  before = snapshot(copy)
  with read_only(copy):
    proc = run_module('twotower_jax.analyze', f'--workdir={copy}',
                      *[f'--config.{k}={v}' for k, v in FAST.items()], timeout=600)
    lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f'cannot write the analysis to {copy}/analysis (' in lines[0]
    assert 'pass --out=PATH' in lines[0]
    summary = runner.run(analysis_config(copy), copy, out_dir=out)
  assert snapshot(copy) == before
  assert summary['step'] == 6 and summary_of(out)['step'] == 6
  assert os.path.exists(os.path.join(out, workdir_lib.REPORT_MD))


def test_out_never_replaces_a_run_directory(copy, tmp_path):
  before = snapshot(copy)
  for out in (copy, str(tmp_path)):  # the workdir itself, and a folder holding it
    with pytest.raises(runner.AnalysisError, match='is a run directory or holds one'):
      runner.run(analysis_config(copy), copy, out_dir=out)
  assert snapshot(copy) == before


def test_out_never_replaces_a_folder_of_other_files(copy, tmp_path):
  """--out replaces its folder whole: a folder holding anything but an earlier analysis is
  refused before any work, its files untouched; an earlier analysis may be replaced."""
  out = tmp_path / 'mine'
  out.mkdir()
  (out / 'important.txt').write_text('precious')
  with pytest.raises(runner.AnalysisError, match='holds files that are not an earlier analysis'):
    runner.run(analysis_config(copy), copy, out_dir=str(out))
  assert (out / 'important.txt').read_text() == 'precious'


@pytest.mark.slow
def test_sigterm_during_a_reanalysis_leaves_the_previous_outputs(copy):
  """SIGTERM unwinds the analysis (exit 143, the staging folder removed): DIR/analysis keeps
  the other step's outputs."""
  out = workdir_lib.analysis_dir(copy)
  runner.run(analysis_config(copy, **{'analysis.step': 3}), copy)
  before = snapshot(out)
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'twotower_jax.analyze', f'--workdir={copy}', '--step=6',
       *[f'--config.{k}={v}' for k, v in FAST.items()]],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  csv = workdir_lib.PREFERENCE_CSV

  def step_6_written():  # its first output file, wherever the analysis writes it
    return (glob.glob(os.path.join(copy, '.analysis.tmp-*', csv)) or
            snapshot(out).get(csv) != before[csv])
  while not step_6_written():
    assert proc.poll() is None, 'the analysis ended before writing anything'
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM
  assert snapshot(out) == before and summary_of(out)['step'] == 3
  assert not glob.glob(os.path.join(copy, '.analysis.tmp-*'))


def test_a_checkpoint_rotated_away_while_read_is_read_again(copy, monkeypatch):
  real = ocp.CheckpointManager.restore
  deleted = []

  def rotated(self, step, *args, **kwargs):
    if not deleted:  # what a training run's keep_checkpoints does, in the middle of the read
      deleted.append(step)
      shutil.rmtree(os.path.join(checkpoints.directory(copy), str(step)))
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', rotated)
  config = analysis_config(copy)
  assert run_lib.restore(config, copy).step == 3 and deleted == [6]

  deleted.clear()
  with pytest.raises(checkpoints.CheckpointVanished) as e:  # a step asked for by number
    run_lib.restore(config, copy, step=3)
  message = str(e.value)
  assert 'was deleted while it was read' in message and 'config' not in message


# --- round 3 (docs/RELIABILITY.md): modes keep each other's outputs; where --out may go ----


def test_a_plain_reanalysis_keeps_what_steps_and_compare_wrote(copy):
  """A plain analysis replaces DIR/analysis whole but carries over analysis/steps/,
  over_training.* and its figure (--steps: an hour for 'all') and compare/ (--compare)."""
  out = workdir_lib.analysis_dir(copy)
  others = {os.path.join(workdir_lib.STEPS_DIR, '3', workdir_lib.SUMMARY_JSON): '{"step": 3}',
            os.path.join(workdir_lib.COMPARE_DIR, workdir_lib.COMPARE_JSON): '{"pairs": []}',
            workdir_lib.OVER_TRAINING_JSON: '{"steps": []}', workdir_lib.OVER_TRAINING_MD: '# x',
            os.path.join(workdir_lib.FIG_DIR, 'over_training.png'): 'png'}
  for rel, text in others.items():
    os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
    with open(os.path.join(out, rel), 'w') as f:
      f.write(text)
  runner.run(analysis_config(copy), copy)
  assert summary_of(out)['step'] == 6
  for rel, text in others.items():
    with open(os.path.join(out, rel)) as f:
      assert f.read() == text, rel
  assert os.path.exists(os.path.join(out, workdir_lib.FIG_DIR, 'agreement.png'))  # its own too


def test_out_is_never_inside_checkpoints_nor_a_file_in_any_mode(copy, tmp_path):
  """A training run takes a folder named by a number in checkpoints/ for a checkpoint (and
  deleted `analyze --out=DIR/checkpoints/99` on resuming); a file is not a folder (tracebacks
  before). Every mode refuses both before any work, the workdir unchanged."""
  from twotower_jax import generation  # pylint: disable=g-import-not-at-top
  from twotower_jax.analysis import compare  # pylint: disable=g-import-not-at-top
  before = snapshot(copy)
  inside = os.path.join(checkpoints.directory(copy), '99')
  a_file = os.path.join(copy, workdir_lib.CONFIG_JSON)
  other = str(tmp_path / 'other')
  for out, match in ((inside, 'is inside ' + checkpoints.directory(copy)),
                     (a_file, 'is a file, not a directory')):
    with pytest.raises(runner.AnalysisError, match=match):
      runner.run(analysis_config(copy), copy, out_dir=out)
    with pytest.raises(runner.AnalysisError, match=match):
      runner.run_over_training(analysis_config(copy), copy, 'all', out_dir=out)
    with pytest.raises(compare.CompareError, match=match):
      compare.run_compare([copy, other], out)
    with pytest.raises(generation.GenerationError, match=match):
      generation.check_out(out, copy, given=True)
  # Inside another run's checkpoints/ too, whichever run is read.
  with pytest.raises(runner.AnalysisError, match='is inside'):
    runner.run(analysis_config(copy), copy, out_dir=os.path.join(inside, 'deeper'))
  assert snapshot(copy) == before


def test_a_step_deleted_during_steps_names_the_steps_still_kept(copy, monkeypatch):
  """--steps over a run whose training rotates checkpoints away: the deleted step is named
  with the kept ones to rerun with (it offered '0 for the latest', which --steps has not)."""
  real = runner.run

  def rotated(config, workdir, out_dir=None):
    if config.analysis.step == 3:  # deleted by the training run's keep_checkpoints
      shutil.rmtree(os.path.join(checkpoints.directory(copy), '3'))
    return real(config, workdir, out_dir)
  monkeypatch.setattr(runner, 'run', rotated)
  with pytest.raises(runner.AnalysisError) as e:
    runner.run_over_training(analysis_config(copy), copy, 'all')
  message = str(e.value)
  assert message.startswith('--steps: checkpoint 3 was deleted while the analysis ran')
  assert message.endswith('rerun with --steps=6') and '0 for the latest' not in message
