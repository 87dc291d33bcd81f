"""Generation from a trained run (python -m twotower_jax.generate): samples and their views, the
same samples from resume-restored params, Co-LLM shares, and one line for each bad input."""

import os
import re
import shutil

import numpy as np
import pytest

from conftest import run_module, snapshot, tiny_config
from twotower_jax import generation
from twotower_jax import workdir as workdir_lib
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
    ('trained', ['--prompt=Hi', '--temperature=-1'], '--temperature=-1.0 must be >= 0'),
    ('trained', ['--prompt=Hi', '--co_llm=argmax'], '--co_llm needs a mixture gate'),
    ('trained', [], 'give exactly one of --prompt'),
    ('trained', ['--prompt=Hi', '--num_samples=0'], '--num_samples=0 must be >= 1'),
    ('trained', ['--prompt=Hi', '--step=4'], 'no checkpoint for step 4'),
    ('no_checkpoint', ['--prompt=Hi'], 'has no checkpoints'),
    ('mlm', ['--prompt=Hi'], 'model.tower_type=mlm is not a left-to-right generator'),
    ('bilstm', ['--prompt=Hi'], 'model.tower_type=bilstm is not a left-to-right generator'),
    ('missing', ['--prompt=Hi'], 'does not exist'),
])
def test_bad_input_is_one_line(trained, small_corpus_dir, tmp_path, case, args, message):
  workdir = trained[1]
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
