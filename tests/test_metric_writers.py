"""The metric writers: TensorBoard purges what a resumed run redoes, Weights & Biases logs
offline and continues its run, and the eval line has bits per byte."""

import glob
import math
import os
import struct

import numpy as np
import pytest

from twotower_jax import workdir as workdir_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.data import windows as data_lib
from twotower_jax.train import loop as train
from twotower_jax.train import metrics as metrics_lib


def _events(path: str):
  """The Event protos of one TensorBoard event file, in order."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  at = 0
  while at < len(data):
    (n,) = struct.unpack('<Q', data[at:at + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[at + 12:at + 12 + n])
    yield event
    at += 12 + n + 4


def _as_tensorboard_shows(logdir: str, tag: str) -> dict[int, float]:
  """{step: value} of `tag` as TensorBoard shows it: files in order, and a SessionLog START at
  step s drops the points at steps >= s read before it (how it purges a restarted run)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  points = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.*'))):
    for e in _events(path):
      if e.HasField('session_log') and e.session_log.status == event_pb2.SessionLog.START:
        points = [(s, v) for s, v in points if s < e.step]
      for v in e.summary.value:
        if v.tag == tag:
          points.append((e.step, v.simple_value))
  assert len({s for s, _ in points}) == len(points), f'{tag} has a step twice: {points}'
  return dict(points)


def test_tensorboard_purges_the_steps_a_resumed_run_redoes(tmp_path):
  workdir = str(tmp_path)
  first = metrics_lib.Writer(workdir)
  first.truncate_after(-1)
  for step in range(1, 7):
    first.write('train', {'loss': 10.0 + step}, step)
  first.close()  # killed after step 6, its checkpoint at step 3
  resumed = metrics_lib.Writer(workdir)
  resumed.truncate_after(3)
  for step in range(4, 9):
    resumed.write('train', {'loss': 20.0 + step}, step)
  resumed.close()
  shown = _as_tensorboard_shows(workdir_lib.path(workdir, workdir_lib.TENSORBOARD), 'train/loss')
  assert shown == {1: 11.0, 2: 12.0, 3: 13.0, 4: 24.0, 5: 25.0, 6: 26.0, 7: 27.0, 8: 28.0}
  assert [l['step'] for l in workdir_lib.read_metrics(workdir)] == list(range(1, 9))


@pytest.fixture
def fresh_wandb():
  """W&B keeps its settings (mode, base URL) process-wide after wandb.init: torn down on
  both sides so each test's environment is the one W&B reads."""
  wandb = pytest.importorskip('wandb')
  wandb.teardown()
  yield
  wandb.teardown()


def test_wandb_logs_offline_and_a_resume_continues_the_run(tmp_path, monkeypatch, fresh_wandb):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('WANDB_ERROR_REPORTING', 'false')
  workdir = str(tmp_path)
  for steps in ((1, 2), (3,)):
    writer = metrics_lib.Writer(workdir, tensorboard=False, wandb_project='twotower-test',
                                config={'train': {'steps': 3}})
    writer.truncate_after(steps[0] - 1)
    for step in steps:
      writer.write('eval', {'loss': 5.0 - step, 'bits_per_byte': 1.5}, step)
    writer.close()
  run_id = open(workdir_lib.path(workdir, workdir_lib.WANDB_ID)).read().strip()
  runs = sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*')))
  # one W&B run, twice (W&B adds '-1' to the second folder when both start in one second)
  assert len(runs) == 2 and all(f'-{run_id}' in os.path.basename(r) for r in runs)
  logged = b''.join(open(f, 'rb').read() for r in runs for f in glob.glob(f'{r}/*.wandb'))
  assert b'eval/bits_per_byte' in logged and b'eval/loss' in logged


def test_piece_bytes_count_the_text_each_piece_spells(tmp_path, small_corpus_dir):
  docs = [open(p, encoding='utf-8').read() for p in sorted(glob.glob(f'{small_corpus_dir}/*'))]
  sp = tokenizer_lib.train_or_load(docs, str(tmp_path), 256)
  bytes_V = tokenizer_lib.piece_bytes(sp)
  assert bytes_V[tokenizer_lib.PAD_ID] == 0 and bytes_V[tokenizer_lib.EOS_ID] == 1
  for line in ('Fellow citizens of the Senate and House', 'We the People, in 1787.'):
    ids = sp.encode(line)
    assert tokenizer_lib.UNK_ID not in ids
    assert bytes_V[ids].sum() == len((' ' + line).encode('utf-8'))  # '▁' before the first word


def test_eval_bits_per_byte_are_the_eval_loss_over_the_targets_bytes(two_step_run):
  config, workdir = two_step_run
  from twotower_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  setup = setup_lib.build(config, workdir, train_tokenizer=False)
  line = [l for l in workdir_lib.read_metrics(workdir) if l['kind'] == 'eval'][-1]
  rows = data_lib.eval_batches(setup.splits.val_windows, config.train.batch_size,
                               train.eval_windows(config, None, None))
  targets = np.concatenate([b[:, 1:].ravel() for b in rows])
  targets = targets[targets != tokenizer_lib.PAD_ID]
  n_bytes = tokenizer_lib.piece_bytes(setup.tokenizer)[targets].sum()
  assert line['tokens'] == len(targets)
  assert line['bits_per_byte'] == pytest.approx(
      line['loss'] * line['tokens'] / n_bytes / math.log(2), rel=1e-5)
  assert 'bits_per_word' not in line  # a unigram tokenizer: pieces are not words


def test_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch, fresh_wandb):
  monkeypatch.setenv('WANDB_MODE', 'online')
  monkeypatch.setenv('WANDB_API_KEY', '')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')  # nothing listens: no network
  monkeypatch.setenv('WANDB_INIT_TIMEOUT', '5')
  from twotower_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match='train.wandb_project=.p.: Weights & Biases did not '
                                             'start .*wandb login'):
    metrics_lib.Writer(str(tmp_path), tensorboard=False, wandb_project='p')
