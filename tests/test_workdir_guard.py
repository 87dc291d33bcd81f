"""A workdir is trained by one run at a time (DIR/train.lock), and a workdir whose files are
missing, damaged, read-only or not a directory is refused with one line before anything in
it changes (docs/RELIABILITY.md, "Concurrent runs" and "A damaged or unusable workdir")."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from _faults import read_only
from conftest import REPO, run_module, snapshot, tiny_config
from test_train import cli_overrides
from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import run as run_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.train import loop as train


@pytest.fixture(scope='module')
def trained(small_corpus_dir, tmp_path_factory):
  """A finished two-step run (checkpoints 1 and 2) to damage in copies."""
  config = tiny_config(small_corpus_dir, **{'train.steps': 2, 'train.checkpoint_every': 1,
                                            'train.eval_every': 2})
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture
def copy(trained, tmp_path):
  config, workdir = trained
  out = str(tmp_path / 'run')
  shutil.copytree(workdir, out)
  return config.copy_and_resolve_references(), out


def refused(config, workdir, error, match):
  """Training refused with a one-line `error` containing `match`; the workdir unchanged."""
  before = snapshot(workdir)
  with pytest.raises(error) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert '\n' not in message and match in message, message
  assert snapshot(workdir) == before
  return message


# --- one run at a time ---------------------------------------------------------------

def test_a_second_run_is_refused_at_once_naming_the_holder(tiny, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('keep me')
  with workdir_lib.training_lock(str(workdir)):
    assert workdir_lib.lock_holder(str(workdir)).startswith(f'pid {os.getpid()} on ')
    lock_file = snapshot(str(workdir))
    message = refused(tiny(), str(workdir), workdir_lib.WorkdirBusy, f'pid {os.getpid()} on ')
    assert 'being trained by another run' in message
    assert snapshot(str(workdir)) == lock_file
  assert sorted(os.listdir(workdir)) == ['notes.txt']  # the lock file goes with its holder
  assert workdir_lib.lock_holder(str(workdir)) is None


_HOLD = ('import sys, time\nfrom twotower_jax import workdir\n'
         'lock = workdir.training_lock(sys.argv[1])\nlock.__enter__()\n'
         'print("locked", flush=True)\n'
         'time.sleep(600)\n')


def test_the_cli_refuses_a_held_workdir_and_kill_9_releases_it(tiny, tmp_path):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONPATH=REPO)
  holder = subprocess.Popen([sys.executable, '-c', _HOLD, workdir], stdout=subprocess.PIPE,
                            text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    proc = run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                      *cli_overrides(tiny()), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f'pid {holder.pid} on ' in lines[0], lines
    assert os.listdir(workdir) == [workdir_lib.LOCK]  # nothing of the refused run
  finally:
    holder.kill()  # SIGKILL: the holder cleans nothing up; the OS drops its lock
    holder.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK))
  assert workdir_lib.lock_holder(workdir) is None
  with workdir_lib.training_lock(workdir):
    assert workdir_lib.lock_holder(workdir).startswith(f'pid {os.getpid()} ')


# --- a damaged or unusable workdir ------------------------------------------------------

def test_checkpoints_without_config_json_are_refused(copy):
  config, workdir = copy
  os.remove(os.path.join(workdir, workdir_lib.CONFIG_JSON))
  config.data.seq_len = 16  # would have been accepted, and recorded, before
  refused(config, workdir, workdir_lib.WorkdirError, 'has checkpoints (up to step 2) but no '
          'config.json')


def test_a_compile_only_field_resumes_the_run_another_layer_count_is_refused(copy):
  """model.scan_unroll changes how the step compiles, not the run (config.COMPILE_ONLY): the
  saved run is accepted with the layers' scan unrolled; another layer count is not."""
  config, workdir = copy
  saved = train.check_workdir(config, workdir)
  config.model.scan_unroll = config.model.n_layers + 3
  assert train.check_workdir(config, workdir).to_dict() == saved.to_dict()
  config.model.n_layers += 1
  message = refused(config, workdir, config_lib.ConfigError, 'holds a run with a different '
                    f'config (model.n_layers: {saved.model.n_layers} -> {config.model.n_layers})')
  assert 'scan_unroll' not in message


@pytest.mark.parametrize('content, match', [
    ('{"model": {"n_towers": 2', 'is damaged, not valid JSON'),
    ('[1, 2]', 'holds a JSON list, not a run config'),
    ('{"model": 5}', 'has a value of the wrong type'),
    ('{"model": {"n_towers": null}}', 'has a value of the wrong type (model.n_towers is null)'),
    ('{}', 'is damaged: it lacks the model, data, train section(s)'),
    ('{"model": {}, "data": {}}', 'is damaged: it lacks the train section(s)'),
])
def test_a_damaged_config_json_is_one_line(copy, content, match):
  config, workdir = copy
  with open(os.path.join(workdir, workdir_lib.CONFIG_JSON), 'w') as f:
    f.write(content)
  refused(config, workdir, workdir_lib.WorkdirError, match)
  with pytest.raises(workdir_lib.WorkdirError, match=re.escape(match)):  # the analysis too
    run_lib.load_config(workdir)


def test_a_deleted_tokenizer_is_missing_not_retrained(copy):
  config, workdir = copy
  os.remove(os.path.join(workdir, workdir_lib.TOKENIZER))
  message = refused(config, workdir, tokenizer_lib.TokenizerError, 'tokenizer.model is missing')
  assert 'put the file back' in message


def test_a_workdir_that_is_a_file_is_one_line(tiny, tmp_path):
  file = tmp_path / 'run'
  file.write_text('not a directory')
  refused(tiny(), str(file), workdir_lib.WorkdirError, 'is a file, not a directory')
  with pytest.raises(errors.UserError, match='is a file, not a directory'):
    run_lib.load_config(str(file))


def test_a_read_only_workdir_is_one_line(copy):
  config, workdir = copy
  with read_only(workdir):
    refused(config, workdir, workdir_lib.WorkdirError, f'cannot write to {workdir} (')


# --- the eval set ---------------------------------------------------------------------

def test_a_resume_with_another_batch_size_keeps_the_eval_set(copy):
  config, workdir = copy
  config.train.batch_size, config.train.steps, config.train.eval_every = 4, 4, 2
  train.train_and_evaluate(config, workdir)
  lines = workdir_lib.read_metrics(workdir)
  evals = {l['step']: l for l in lines if l['kind'] == 'eval'}
  assert sorted(evals) == [2, 4]
  assert evals[4]['tokens'] == evals[2]['tokens']  # the same 16 windows scored
  note = [l for l in lines if l['kind'] == 'eval_set']
  assert len(note) == 1 and note[0]['windows'] == 16 and note[0]['configured'] == 8
  assert json.load(open(os.path.join(workdir, workdir_lib.CONFIG_JSON)))['train'][
      'batch_size'] == 4


def test_the_default_eval_set_is_128_windows():
  """configs/default.py: batch 16 x 8 eval batches, the windows its val loss was measured on."""
  config = config_lib.base_config()
  assert train.eval_windows(config, None, None) == 128
  assert train.eval_windows(config, {'eval_windows': 64}, None) == 64
  old = config.copy_and_resolve_references()
  old.train.batch_size = 4
  assert train.eval_windows(config, {}, old) == 32  # a checkpoint from before the field


def test_a_folder_in_checkpoints_that_is_no_checkpoint_is_refused_and_kept(copy):
  """A folder named by a number in checkpoints/ that Orbax did not write (an analysis written
  there) was deleted on resume as an 'incomplete checkpoint', the log saying its steps would
  be trained again; it is refused, named and left where it is."""
  config, workdir = copy
  foreign = os.path.join(workdir, workdir_lib.CHECKPOINTS, '99')
  os.makedirs(foreign)
  with open(os.path.join(foreign, workdir_lib.SUMMARY_JSON), 'w') as f:
    f.write('{"step": 2}')
  config.train.steps = 4
  message = refused(config, workdir, errors.UserError, f'{foreign} is not a checkpoint')
  assert 'move it out of' in message
