"""Generation from a trained run (python -m twotower_jax.generate): samples and their views, the
same samples from resume-restored params, Co-LLM shares, and one line for each bad input."""

import contextlib
import errno
import glob
import json
import logging
import logging.handlers
import math
import os
import re
import shutil

import numpy as np
import pytest

from conftest import run_module, snapshot, tiny_config
from twotower_jax import generation
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import decode
from twotower_jax.train import checkpoints
from twotower_jax.train import loop

ANSI = re.compile(r'\x1b\[[0-9;]*m')


@pytest.fixture(scope='module')
def trained(small_corpus_dir, tmp_path_factory):
  """A tiny concat run with checkpoints at steps 3 and 6 (max_len 32)."""
  config = tiny_config(small_corpus_dir)
  workdir = str(tmp_path_factory.mktemp('generate') / 'run')
  loop.train_and_evaluate(config, workdir)
  return config, workdir


def _generate(workdir, *args):
  return run_module('twotower_jax.generate', f'--workdir={workdir}', *args, timeout=300)


def test_prompts_from_a_file_give_samples_views_and_attribution(trained, tmp_path):
  _, workdir = trained
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('Fellow citizens\n\nThe Congress of the United States\n')
  out = tmp_path / 'out'
  proc = _generate(workdir, f'--prompt_file={prompts}', '--num_samples=2', '--max_new_tokens=6',
                   '--seed=3', '--color=always', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '\x1b[48;2;' in proc.stdout  # pieces on their tower's colour
  text = ANSI.sub('', proc.stdout)
  recs = workdir_lib.read_jsonl(str(out / workdir_lib.GENERATIONS_JSONL))
  assert [(r['prompt_index'], r['sample']) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for rec in recs:
    assert rec['prompt'] in ('Fellow citizens', 'The Congress of the United States')
    assert 1 <= len(rec['tokens']) <= 6 and rec['step'] == 6 and rec['attribution'] == 'ablation'
    assert rec['prompt'].replace(' ', '') in ''.join(rec['prompt_pieces']).replace('\u2581', '')
    for t in rec['tokens']:
      assert len(t['drop']) == 2 and -1 <= t['lean'] <= 1 and t['logp'] <= 0
    assert np.isclose(sum(rec['tower_share']), 1.0)
    assert f'prompt {rec["prompt_index"] + 1}, sample {rec["sample"] + 1}' in text
    assert (rec['prompt'] + rec['continuation']).replace(' ', '') in text.replace(' ', '')
  assert max(abs(t['lean']) for r in recs for t in r['tokens']) == 1.0  # normalised to the max
  page = (out / workdir_lib.GENERATIONS_HTML).read_text()
  assert page.count('class="passage"') == 4 and 'tower 0 (strong)' in page
  assert not os.path.exists(workdir_lib.generate_dir(workdir))  # --out was used


@pytest.mark.slow
def test_a_fixed_seed_gives_the_same_samples_from_resume_restored_params(trained, tmp_path):
  config, workdir = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(checkpoints.directory(resumed), '6'))
  shutil.rmtree(workdir_lib.generate_dir(resumed), ignore_errors=True)
  loop.train_and_evaluate(config, resumed)  # resumes at step 3, ends at 6
  samples = {}
  for name, wd in (('first', workdir), ('resumed', resumed)):
    for seed in (7, 8):
      proc = _generate(wd, '--prompt=Fellow citizens', f'--seed={seed}', '--max_new_tokens=10',
                       '--temperature=1.0', '--top_k=50', '--color=never')
      assert proc.returncode == 0, proc.stderr[-3000:]
      recs = workdir_lib.read_jsonl(os.path.join(workdir_lib.generate_dir(wd),
                                                 workdir_lib.GENERATIONS_JSONL))
      samples[name, seed] = ([t['id'] for t in recs[0]['tokens']], proc.stdout)
  assert samples['first', 7] == samples['resumed', 7]
  assert samples['first', 8] == samples['resumed', 8]
  assert samples['first', 7][0] != samples['first', 8][0]


@pytest.mark.slow
def test_co_llm_reports_which_tower_wrote_each_token(small_corpus_dir, tmp_path):
  workdir = str(tmp_path / 'latent')
  loop.train_and_evaluate(tiny_config(small_corpus_dir, **{'model.gate': 'latent',
                                                           'train.steps': 3}), workdir)
  proc = _generate(workdir, '--prompt=Fellow citizens', '--co_llm=threshold', '--co_llm_tower=1',
                   '--co_llm_threshold=0.0', '--max_new_tokens=5', '--color=never')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '(tokens written by: tower 0 0%, tower 1 100%)' in proc.stdout  # always deferred
  rec = workdir_lib.read_jsonl(os.path.join(workdir_lib.generate_dir(workdir),
                                            workdir_lib.GENERATIONS_JSONL))[0]
  assert rec['attribution'] == 'co_llm' and rec['tower_share'] == [0.0, 1.0]
  for t in rec['tokens']:
    assert t['tower'] == 1 and t['lean'] == -1.0
    assert np.isclose(sum(t['prior']), 1.0) and np.isclose(sum(t['posterior']), 1.0)


def test_terminal_view_marks_the_leading_tower_of_three():
  rec = {'prompt_index': 0, 'sample': 0, 'stop': 'eos', 'attribution': 'posterior',
         'prompt_pieces': ['\u2581Hi'], 'tower_share': [0.0, 0.0, 1.0],
         'tokens': [{'piece': '\u2581there', 'posterior': [0.1, 0.2, 0.7]}]}
  assert 'Hi there\u00b2' in generation.terminal_view([rec], color=True)
  assert 'Hi there\n' in generation.terminal_view([rec], color=False) + '\n'


def _config_only_workdir(small_corpus_dir, tmp_path, **overrides):
  workdir = str(tmp_path / 'other')
  os.makedirs(workdir)
  workdir_lib.write_config(tiny_config(small_corpus_dir, **overrides), workdir)
  return workdir


@pytest.mark.parametrize('case, args, message', [
    ('trained', ['--prompt='], 'the prompt is empty'),
    ('trained', ['--prompt=   '], 'the prompt is empty'),
    ('trained', ['--prompt=' + 'Fellow citizens ' * 20], 'longer than model.max_len=32'),
    ('trained', ['--prompt=Hi', '--top_p=0'], '--top_p=0.0 must be in (0, 1]'),
    ('trained', ['--prompt=Hi', '--top_p=1.5'], '--top_p=1.5 must be in (0, 1]'),
    ('trained', ['--prompt=Hi', '--temperature=-1'], '--temperature=-1.0 must be a finite number'),
    ('trained', ['--prompt=Hi', '--co_llm=argmax'], '--co_llm needs a mixture gate'),
    ('trained', [], 'give exactly one of --prompt'),
    ('trained', ['--prompt=Hi', '--num_samples=0'], '--num_samples=0 must be >= 1'),
    ('trained', ['--prompt=Hi', '--step=4'], 'no checkpoint for step 4'),
    ('no_checkpoint', ['--prompt=Hi'], 'has no checkpoints'),
    ('mlm', ['--prompt=Hi'], 'model.tower_type=mlm is not a left-to-right generator'),
    ('bilstm', ['--prompt=Hi'], 'model.tower_type=bilstm is not a left-to-right generator'),
    ('missing', ['--prompt=Hi'], 'does not exist'),
    # Round 3 (docs/RELIABILITY.md): numbers, prompt input and --out checked before any work.
    ('trained', ['--prompt=Hi', '--temperature=inf'], '--temperature=inf must be a finite'),
    ('trained', ['--prompt=Hi', '--num_samples=1000000'], 'more than the 1024 one call'),
    ('trained', ['--prompt=Hi', '--seed=-1'], '--seed=-1 must be an integer in [0, 2**32)'),
    ('trained', ['--prompt=Hi', '--step=-1'], '--step=-1 must be >= 0'),
    ('trained', ['--prompt_file=/dev/zero'], '--prompt_file=/dev/zero is larger than 1 MiB'),
    ('trained', ['--prompt_file=TMP/nul.txt'], 'is a binary file, not text (NUL byte at byte 2)'),
    ('trained', ['--prompt=Hi', '--out=WORKDIR/checkpoints/99'], 'checkpoints, where a training'),
    ('trained', ['--prompt=Hi', '--out=WORKDIR'], 'is a run directory or holds one'),
    ('trained', ['--prompt=Hi', '--out=WORKDIR/config.json'], 'is a file, not a directory'),
    ('other_tokenizer', ['--prompt=Hi'], 'is not the tokenizer the checkpoints were trained'),
])
def test_bad_input_is_one_line(trained, small_corpus_dir, tmp_path, case, args, message):
  workdir = trained[1]
  (tmp_path / 'nul.txt').write_bytes(b'Hi\0there\n')
  if case == 'other_tokenizer':  # same size, other pieces: every id would mean another piece
    workdir = str(tmp_path / 'copy')
    shutil.copytree(trained[1], workdir)
    docs = [' '.join(reversed(open(f).read().split())) + ' zyx qwv'
            for f in sorted(glob.glob(os.path.join(small_corpus_dir, '*.txt')))]
    tokenizer_lib.train(docs, os.path.join(workdir, workdir_lib.TOKENIZER), 256)
  args = [a.replace('WORKDIR', workdir).replace('TMP', str(tmp_path)) for a in args]
  if case == 'no_checkpoint':
    workdir = str(tmp_path / 'copy')
    shutil.copytree(trained[1], workdir)
    shutil.rmtree(checkpoints.directory(workdir))
  elif case in ('mlm', 'bilstm'):
    workdir = _config_only_workdir(small_corpus_dir, tmp_path, **{
        'model.tower_type': case, 'model.embedding.mode': 'projected'})
  elif case == 'missing':
    workdir = str(tmp_path / 'nowhere')
  before = snapshot(workdir) if os.path.exists(workdir) else None
  proc = _generate(workdir, *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
  if before is not None:
    assert snapshot(workdir) == before  # nothing written


def test_a_read_only_workdir_is_refused_before_sampling_and_out_writes_elsewhere(trained,
                                                                                  tmp_path):
  """The output folder is checked before the restore: one line naming --out, nothing printed;
  with --out the same workdir generates."""
  from _faults import read_only  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained[1], workdir)
  with read_only(workdir):
    proc = _generate(workdir, '--prompt=Hi', '--max_new_tokens=2')
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and 'pass --out=DIR' in lines[0], lines
    assert 'generate:' not in proc.stderr and not proc.stdout.strip()  # no work was done
    out = str(tmp_path / 'out')
    proc = _generate(workdir, '--prompt=Hi', '--max_new_tokens=2', f'--out={out}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(out, workdir_lib.GENERATIONS_JSONL))


def test_the_html_page_shows_a_workdir_name_literally():
  """The page's heading is Markdown rendered by markdown-it-py: a workdir named like
  emphasis or HTML is escaped, not formatted."""
  rec = {'prompt_pieces': ['\u2581a'], 'tokens': [{'piece': '\u2581b', 'lean': 0.5}],
         'prompt_index': 0, 'sample': 0, 'stop': 'eos', 'tower_share': [0.5, 0.5],
         'attribution': 'ablation'}
  page = generation.html_page([rec], 'Generations: run_*1*<i>, step 6')
  assert '<h1>Generations: run_*1*&lt;i&gt;, step 6</h1>' in page
  assert 'tokens leaning to (ablation): tower 0 50%, tower 1 50%' in page


@contextlib.contextmanager
def _logged():
  """The messages the package logs (INFO and up) inside the block."""
  handler = logging.handlers.BufferingHandler(100)
  logger = logging.getLogger('twotower_jax')
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  lines = []
  try:
    yield lines
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    lines.extend(r.getMessage() for r in handler.buffer)


def _recs(n: int, logp: float = -1.5) -> list[dict]:
  """Records as generation.records makes them, for the writer alone."""
  return [{'prompt_index': 0, 'sample': j, 'prompt': 'Hi', 'continuation': ' there',
           'stop': 'eos', 'attribution': 'ablation', 'prompt_pieces': ['\u2581Hi'],
           'tower_share': [0.5, 0.5], 'tokens': [{'id': 7, 'piece': '\u2581there', 'logp': logp,
                                                  'drop': [0.1, 0.2], 'lean': -0.5}]}
          for j in range(n)]


@pytest.mark.parametrize('fault', ['full_disk', 'signal'])
def test_outputs_are_replaced_as_one_unit(tmp_path, monkeypatch, fault):
  """generations.jsonl and .html go to a staged folder renamed into place: a full disk or a
  signal while the page is written leaves the earlier pair whole and no temporary file, and
  the full disk's line names the folder."""
  out = str(tmp_path / 'generate')
  generation.write(_recs(1), out, 'first')
  before = snapshot(out)
  real = workdir_lib.write_text

  def failing(file, text):
    if file.endswith(workdir_lib.GENERATIONS_HTML):
      if fault == 'signal':
        raise KeyboardInterrupt  # how cli turns SIGTERM and Ctrl-C into an unwinding exception
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(file, text)
  monkeypatch.setattr(workdir_lib, 'write_text', failing)
  if fault == 'signal':
    with pytest.raises(KeyboardInterrupt):
      generation.write(_recs(256), out, 'second')
  else:
    with pytest.raises(generation.GenerationError) as e:
      generation.write(_recs(256), out, 'second')
    assert f'cannot write the generations to {out} (No space left on device)' in str(e.value)
  assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ['generate']
  monkeypatch.undo()
  generation.write(_recs(3), out, 'third')
  assert len(workdir_lib.read_jsonl(os.path.join(out, workdir_lib.GENERATIONS_JSONL))) == 3
  assert sorted(os.listdir(out)) == [workdir_lib.GENERATIONS_HTML, workdir_lib.GENERATIONS_JSONL]


def test_generations_jsonl_is_strict_json(tmp_path):
  """RFC 8259 JSON has no NaN or Infinity: a non-finite value is written as null."""
  recs = _recs(1, logp=-math.inf)
  recs[0]['tower_share'] = [math.nan, math.nan]
  generation.write(recs, str(tmp_path), 'strict')

  def refuse(constant):
    raise AssertionError(f'{constant} is not JSON')
  with open(tmp_path / workdir_lib.GENERATIONS_JSONL, encoding='utf-8') as f:
    rec = json.loads(f.readline(), parse_constant=refuse)
  assert rec['tokens'][0]['logp'] is None and rec['tower_share'] == [None, None]


def test_max_new_tokens_is_clipped_to_the_window():
  """The loop's buffers grow with max_new_tokens, but at most max_len + 1 - (shortest
  prompt) tokens fit: more is clipped, with a note; what fits is kept."""
  ids = [np.arange(3), np.arange(5)]
  with _logged() as lines:
    got = generation.fit_window(decode.Sampling(max_new_tokens=10**10), ids, 32)
    assert generation.fit_window(decode.Sampling(max_new_tokens=30), ids, 32).max_new_tokens == 30
  assert got.max_new_tokens == 30
  assert len(lines) == 1 and '--max_new_tokens=10000000000 clipped to 30' in lines[0]


def test_a_huge_max_new_tokens_generates_up_to_the_window(trained, tmp_path):
  """--max_new_tokens=1e10 gave a 65-line OverflowError (1e9: killed for memory)."""
  out = tmp_path / 'out'
  proc = _generate(trained[1], '--prompt=Fellow citizens', '--max_new_tokens=10000000000',
                   '--nostop_at_eos', '--temperature=0', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '--max_new_tokens=10000000000 clipped to' in proc.stderr
  (rec,) = workdir_lib.read_jsonl(str(out / workdir_lib.GENERATIONS_JSONL))
  assert rec['stop'] == 'max_len' and rec['settings']['max_new_tokens'] == len(rec['tokens'])
  assert len(rec['prompt_pieces']) + 1 + len(rec['tokens']) == 32 + 1  # the window, full


def test_prompts_keep_their_lines_and_control_characters_are_named(trained, tmp_path):
  """CRLF line ends are not part of a prompt; characters the tokenizer drops are warned of."""
  file = tmp_path / 'prompts.txt'
  file.write_bytes(b'Fellow citizens\r\n\r\nThe \x01Congress\x07\r\n')
  prompts = generation.read_prompts(None, str(file))
  assert prompts == ['Fellow citizens', 'The \x01Congress\x07']
  sp = tokenizer_lib.load(os.path.join(trained[1], workdir_lib.TOKENIZER))
  with _logged() as lines:
    generation.encode_prompts(sp, prompts, 32)
  (warning,) = lines
  assert "prompt 2 ('The \\x01Congress\\x07')" in warning
  assert 'U+0001 at character 5, U+0007 at character 14' in warning
