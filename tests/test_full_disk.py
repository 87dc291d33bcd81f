"""A save that fails (a full disk) stops the run with one line naming the step directory and
the cause, exit non-zero, earlier checkpoints intact, and the run resumes once there is room;
the pre-flight warns when the disk has less room than the checkpoints the run keeps
(docs/RELIABILITY.md, "A full disk")."""

import errno
import glob
import os

import orbax.checkpoint as ocp
import pytest

from _faults import small_filesystem
from conftest import run_module
from test_train import cli_overrides
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import checkpoints
from twotower_jax.train import loop as train
from twotower_jax.train import preflight


def fail_saves_from(monkeypatch, step, where):
  """Orbax's write of a checkpoint's meta item raises ENOSPC from `step` on: in its background
  thread ('background', reported at the next save or wait) or in the save call ('call')."""
  if where == 'background':
    real = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

    async def save_fn(self, x, directory):
      if isinstance(x, dict) and x.get('step', 0) >= step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
      return await real(self, x, directory)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', save_fn)
  else:
    real = ocp.CheckpointManager.save

    def save(self, at, *args, **kwargs):
      if at >= step:
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device "
                         "[os_error_code='28']")
      return real(self, at, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, 'save', save)


@pytest.mark.parametrize('where', ['background', 'call'])
def test_a_failed_save_stops_the_run_and_it_resumes(tiny, tmp_path, monkeypatch, where):
  workdir = str(tmp_path / 'run')
  config = tiny(**{'train.checkpoint_every': 1, 'train.eval_every': 6})
  fail_saves_from(monkeypatch, 4, where)
  with pytest.raises(checkpoints.CheckpointError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'saving checkpoint {workdir}/checkpoints/4 failed (No space left '
                            'on device; '), message
  assert 'MiB free there' in message and 'resume from step 3' in message
  assert checkpoints.complete_steps(workdir) == [1, 2, 3]  # nothing lost
  monkeypatch.undo()  # space again
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 6
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*'))  # the partial save removed
  steps = [l['step'] for l in workdir_lib.read_metrics(workdir) if l['kind'] == 'train']
  assert steps == [1, 2, 3, 4, 5, 6]  # lines after the last checkpoint were redone once


def test_a_full_filesystem_through_the_cli_is_one_line(tiny, tmp_path):
  """A real small tmpfs (root only): Orbax's own write fails, the command prints one line."""
  mount = str(tmp_path / 'disk')
  workdir = os.path.join(mount, 'run')
  config = tiny(**{'train.checkpoint_every': 1, 'train.keep_checkpoints': 8, 'train.steps': 8})
  with small_filesystem(mount, 2200):
    proc = run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                      *cli_overrides(config), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors_ = [l for l in proc.stderr.splitlines() if 'error' in l.lower() or 'Trace' in l]
    assert len(errors_) == 1 and errors_[0].startswith('error: saving checkpoint '), \
        proc.stderr[-3000:]
    assert 'No space left on device' in errors_[0] and 'MiB free there' in errors_[0]
    assert 'preflight: only' in proc.stderr  # it was warned about before the first save
    saved = checkpoints.complete_steps(workdir)
    assert saved and max(saved) < 8
    os.system(f'mount -o remount,size=16m {mount}')
    proc = run_module('twotower_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
                      *cli_overrides(config), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'resumed from {workdir}/checkpoints at step {max(saved)}' in proc.stderr


def test_preflight_warns_when_free_space_is_below_the_kept_checkpoints(tmp_path, monkeypatch):
  target = str(tmp_path / 'run' / 'checkpoints')  # not created yet: its parent is measured
  free = preflight.shutil.disk_usage(str(tmp_path)).free
  assert preflight.check_disk(target, 1 << 20, 3) is None
  message = preflight.check_disk(target, free // 2, 3)
  assert message.startswith('preflight: only ') and 'less than 3 checkpoints' in message
