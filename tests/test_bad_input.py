"""Bad input catalogue: each case is one clear error (problem + fix), before anything in the
workdir is written. Config-override cases already covered through the CLI (unknown field,
bad type, heads, window, tower axis) are in test_cli.py."""

import glob
import os
import shutil

import pytest

from conftest import cli_overrides, run_module, snapshot
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import checkpoints
from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax import errors
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.train import loop as train


def refused(config, workdir, error=errors.UserError, match=''):
  """Runs training expecting `error`; asserts a one-line message and an untouched workdir."""
  before = snapshot(workdir) if os.path.exists(workdir) else None
  existed = os.path.exists(workdir)
  with pytest.raises(error) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert '\n' not in message and match in message, message
  assert os.path.exists(workdir) == existed
  if existed:
    assert snapshot(workdir) == before
  return message


@pytest.fixture(scope='module')
def trained(two_step_run):
  """A finished two-step run to damage in copies."""
  return two_step_run


def copy_of(trained, tmp_path):
  config, workdir = trained
  out = str(tmp_path / 'run')
  shutil.copytree(workdir, out)
  return config, out


def test_config_file_with_a_mistyped_field(tiny, tmp_path):
  config = tiny()
  config.train.stepz = 3  # what a typo in a config file does: adds a field nothing reads
  message = refused(config, str(tmp_path / 'run'), config_lib.ConfigError,
                    'unknown config field train.stepz')
  assert 'did you mean train.steps?' in message


def test_batch_not_divisible_by_data_devices(tiny, tmp_path):
  (tmp_path / 'run').mkdir()
  refused(tiny(**{'train.batch_size': 6}), str(tmp_path / 'run'), config_lib.ConfigError,
          'train.batch_size=6 is not divisible by the 4 data-parallel devices')


def test_unknown_on_nonfinite_mode(tiny, tmp_path):
  refused(tiny(**{'train.on_nonfinite': 'ignore'}), str(tmp_path / 'run'),
          config_lib.ConfigError, "train.on_nonfinite='ignore' is unknown")


@pytest.mark.parametrize('case, match', [
    ('missing', 'matches no files; check the pattern'),
    ('empty', 'empty file; remove it from the glob'),
    ('latin1', 'not UTF-8 text (byte'),
])
def test_bad_corpus_files(tiny, tmp_path, small_corpus_dir, case, match):
  corpus_dir = tmp_path / 'corpus'
  shutil.copytree(small_corpus_dir, corpus_dir)
  bad = corpus_dir / 'bad.txt'
  if case == 'missing':
    glob_ = str(tmp_path / 'nowhere' / '*.txt')
  else:
    bad.write_bytes(b'' if case == 'empty' else 'caf\xe9 au lait\n'.encode('latin-1'))
    glob_ = str(corpus_dir / '*.txt')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('keep me')
  message = refused(tiny(**{'data.text_glob': glob_}), str(workdir), corpus_lib.CorpusError,
                    match)
  if case != 'missing':
    assert str(bad) in message  # names the file


def test_vocab_larger_than_the_corpus_supports(tiny, tmp_path):
  workdir = str(tmp_path / 'run')
  refused(tiny(**{'data.vocab_size': 60000}), workdir, tokenizer_lib.TokenizerError,
          'data.vocab_size=60000 is larger than this corpus supports')
  assert not os.path.exists(workdir)  # not even an empty directory is left


def test_a_workdir_with_another_model_or_vocab_is_refused(trained, tmp_path):
  config, workdir = copy_of(trained, tmp_path)
  for key, value, diff in [('model.d_model', 64, 'model.d_model: 32 -> 64'),
                           ('data.vocab_size', 300, 'data.vocab_size: 256 -> 300')]:
    other = config.copy_and_resolve_references()
    section, field = key.split('.')
    other[section][field] = value
    message = refused(other, workdir, config_lib.ConfigError, diff)
    assert 'new --workdir' in message


@pytest.mark.parametrize('damage', ['truncate_data', 'flip_data_byte', 'truncate_metadata'])
def test_corrupted_checkpoint(trained, tmp_path, damage):
  config, workdir = copy_of(trained, tmp_path)
  state_dir = os.path.join(checkpoints.directory(workdir), '2', 'state')
  if damage == 'truncate_metadata':
    victim = os.path.join(state_dir, '_METADATA')
  else:
    files = [f for f in glob.glob(os.path.join(state_dir, '**', 'd', '*'), recursive=True)]
    victim = max(files, key=os.path.getsize)  # the largest chunk of parameter bytes
  data = bytearray(open(victim, 'rb').read())
  if damage == 'flip_data_byte':
    data[len(data) // 2] ^= 0xFF
  else:
    data = data[:len(data) // 2]
  with open(victim, 'wb') as f:
    f.write(bytes(data))
  message = refused(config, workdir, checkpoints.CheckpointError, 'checkpoint ')
  assert os.path.join('checkpoints', '2') in message
  assert 'damaged' in message or 'corrupted' in message or 'fingerprint' in message, message


@pytest.mark.parametrize('command, victim', [('main', '_METADATA'), ('main', 'manifest.ocdbt'),
                                             ('analyze', 'manifest.ocdbt')])
def test_corrupted_checkpoint_through_the_cli_is_one_line(trained, tmp_path, command, victim):
  """One line and nothing else: a truncated OCDBT manifest also made TensorStore's threads
  report 'Event loop is closed' tracebacks before cli's unraisable hook dropped them."""
  config, workdir = copy_of(trained, tmp_path)
  with open(os.path.join(checkpoints.directory(workdir), '2', 'state', victim), 'r+b') as f:
    f.truncate(10)
  before = snapshot(workdir)
  args = (('--config=configs/default.py', *cli_overrides(config)) if command == 'main' else ())
  proc = run_module(f'twotower_jax.{command}', f'--workdir={workdir}', *args, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith('WARNING')]
  errors_ = [l for l in lines if l.startswith('error: ')]
  assert len(errors_) == 1 and 'cannot be read' in errors_[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and 'Event loop' not in proc.stderr, proc.stderr[-2000:]
  assert snapshot(workdir) == before


def test_tokenizer_of_another_vocab_size(trained, tmp_path):
  config, workdir = copy_of(trained, tmp_path)
  docs = corpus_lib.load(config.data).train_docs
  tokenizer_lib.train(docs, os.path.join(workdir, workdir_lib.TOKENIZER), 200)
  refused(config, workdir, tokenizer_lib.TokenizerError, 'has 200 pieces but data.vocab_size=256')


def test_tokenizer_other_than_the_checkpoints(trained, tmp_path):
  """Same vocab size, different pieces: caught by the digest saved with each checkpoint."""
  config, workdir = copy_of(trained, tmp_path)
  docs = corpus_lib.load(config.data).train_docs
  tokenizer_lib.train(docs[:3], os.path.join(workdir, workdir_lib.TOKENIZER), 256)
  refused(config, workdir, tokenizer_lib.TokenizerError,
          'is not the tokenizer the checkpoints were trained with')


def test_analysis_of_a_workdir_without_checkpoints(tiny, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  workdir_lib.write_config(tiny(), str(workdir))
  before = snapshot(str(workdir))
  proc = run_module('twotower_jax.analyze', f'--workdir={workdir}', timeout=300)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'checkpoint' in lines[0], proc.stderr[-2000:]
  assert snapshot(str(workdir)) == before


def test_a_batch_beyond_host_memory_is_refused_before_anything_is_written(trained, tmp_path):
  """XLA:CPU would die at the first step with RESOURCE_EXHAUSTED (and hang); the pre-flight
  names the fix instead, and the run's config.json and metrics stay as they were."""
  config, workdir = copy_of(trained, tmp_path)
  huge = config_lib.from_dict(config_lib.to_dict(config))
  huge.train.batch_size = 65536
  huge.train.steps = 4
  message = refused(huge, workdir, errors.UserError, 'MiB of temporaries on this host')
  assert 'lower train.batch_size, or raise train.grad_accum_steps' in message
  # A new workdir is not left behind (its tokenizer and empty checkpoints/ are taken back).
  refused(huge, str(tmp_path / 'new'), errors.UserError, 'MiB of temporaries on this host')


def test_a_model_beyond_host_memory_names_its_largest_parameter(trained, tmp_path):
  """model.max_len=1e9 (a 10^9-row position table) was blamed on train.batch_size by the
  temporaries check; the state is measured before it is made, naming the parameter."""
  config, workdir = copy_of(trained, tmp_path)
  shutil.rmtree(checkpoints.directory(workdir))
  os.remove(os.path.join(workdir, workdir_lib.CONFIG_JSON))  # a new run on this tokenizer
  huge = config_lib.from_dict(config_lib.to_dict(config))
  huge.model.max_len = 10**9
  message = refused(huge, workdir, errors.UserError, 'MiB is free on this host')
  assert "its largest parameter, params['embed']['position'] (1000000000, 32)" in message
  assert 'lower model.max_len' in message and 'batch_size' not in message


def test_host_memory_check_counts_every_local_device():
  from twotower_jax.train import preflight  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  preflight.check_host_memory({'temp_size_in_bytes': 100 << 20}, config, 900 << 20, 8)
  with pytest.raises(errors.UserError, match=r'about 1,600 MiB of temporaries .* \(16 device'):
    preflight.check_host_memory({'temp_size_in_bytes': 100 << 20}, config, 900 << 20, 16)
  preflight.check_host_memory({'temp_size_in_bytes': 1 << 40}, config, None, 8)  # unknown: go on
  assert preflight.host_available_bytes() > 0


@pytest.mark.parametrize('field, value, match', [
    ('model.n_heads', 0, 'model.n_heads=0 must be an integer >= 1'),
    ('model.n_layers', 0, 'model.n_layers=0 must be an integer >= 1'),
    ('model.d_model', 0, 'model.d_model=0 must be an integer >= 1'),
    ('model.d_mlp', -1, 'model.d_mlp=-1 must be an integer >= 1'),
    ('data.tokenizer_type', 'nope', "data.tokenizer_type='nope' is unknown"),
    ('train.seed', -1, 'train.seed=-1 must be an integer in [0, 2**32)'),
    ('analysis.probe_weight_decay', float('nan'), 'analysis.probe_weight_decay=nan must be a '
     'finite number'),
    ('analysis.probe_min_delta', float('nan'), 'must be a finite number'),
    ('train.peak_flops', float('nan'), 'train.peak_flops=nan must be a finite number'),
    ('model.latent.balance_weight', float('inf'), 'must be a finite number'),
])
def test_bad_values_are_refused_before_the_workdir_is_made(tiny, tmp_path, field, value, match):
  """Found by the second adversarial run: these crashed after training the tokenizer (and
  left the workdir behind), or were accepted (NaN passes every range check)."""
  config = tiny()
  config_lib.set_fields(config, {field: value})
  refused(config, str(tmp_path / 'run'), config_lib.ConfigError, match)
