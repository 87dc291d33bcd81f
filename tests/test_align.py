"""Embedding alignment between runs: the measures on matrices with known answers, the token
matrices of every embedding mode, the pairs and their reference, and the command."""

import json
import os
import shutil

import numpy as np
import pytest

import _family
from tests.conftest import run_module, tiny_config
from twotower_jax import workdir as workdir_lib
from twotower_jax.analysis import alignment
from twotower_jax.analysis import token_tables
from twotower_jax.report import alignment as report

T, D = 600, 24  # tokens, width: enough tokens for each Procrustes fold to fit D dimensions


def _matrix(seed=0, t=T, d=D):
  """A token matrix with the unequal spectrum of a trained table."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(t, d)) * np.linspace(2.0, 0.2, d)


def _rotation(seed=1, d=D):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


def _values(result):
  return {m: result[m]['value'] for m in alignment.MEASURES}


def test_identical_matrices_align_perfectly():
  x = _matrix()
  res = alignment.compare(x, x.copy(), n_boot=50)
  for m in alignment.MEASURES:
    assert res[m]['value'] == pytest.approx(1.0, abs=1e-9), m
    assert res[m]['ci'] == pytest.approx([1.0, 1.0], abs=1e-9), m


def test_a_rotation_is_seen_through_only_by_the_rotation_invariant_measures():
  x = _matrix()
  res = _values(alignment.compare(x, 3.0 * x @ _rotation(), n_boot=20))
  for m in alignment.ROTATION_INVARIANT:
    assert res[m] == pytest.approx(1.0, abs=1e-9), m
  assert abs(res['row_cosine']) < 0.5  # the coordinates no longer match


def test_unrelated_matrices_score_about_zero_at_any_width():
  """Debiased CKA and cross-fitted Procrustes: no floor of width / tokens (plain CKA of two
  random 600 x 24 matrices is about 0.04, in-sample Procrustes about 0.2)."""
  res = alignment.compare(_matrix(0), _matrix(7), n_boot=100)
  for m in ('cka', 'procrustes', 'row_cosine'):
    assert abs(res[m]['value']) < 0.03, (m, res[m])
    assert res[m]['ci'][0] < 0.0 + 0.03 and res[m]['ci'][0] <= res[m]['value'] <= res[m]['ci'][1]
  assert res['knn']['value'] < 0.1  # chance: k / tokens = 0.017


def test_noise_lowers_each_measure_and_intervals_cover_it():
  """x + noise of the same per-column size: CKA's known answer 1 / (1 + sigma^2) per column
  spectrum; every measure drops below 1 with an interval of positive width around it."""
  x = _matrix()
  noisy = x + 0.5 * np.random.default_rng(3).normal(size=x.shape) * np.linspace(2.0, 0.2, D)
  res = alignment.compare(x, noisy, n_boot=200)
  assert res['cka']['value'] == pytest.approx(1 / 1.25, abs=0.05)
  for m in alignment.MEASURES:
    lo, hi = res[m]['ci']
    assert 0.0 < res[m]['value'] < 1.0 and lo < res[m]['value'] < hi, (m, res[m])


def test_widths_may_differ_except_for_the_row_cosine():
  x = _matrix()
  wide = np.concatenate([x @ _rotation(), np.zeros((T, 8))], axis=1)
  res = alignment.compare(x, wide, n_boot=20)
  for m in alignment.ROTATION_INVARIANT:
    assert res[m]['value'] == pytest.approx(1.0, abs=1e-9), m
  assert np.isnan(res['row_cosine']['value'])


@pytest.mark.parametrize('mode', ['shared', 'projected', 'per_tower'])
@pytest.mark.parametrize('tied', [True, False])
def test_token_matrices_of_each_embedding_mode(mode, tied):
  model = _family.tiny_model(**{'embedding.mode': mode, 'embedding.tied': tied})
  params = _family.init(model)
  got = {k: v for k, v in token_tables.matrices(model.cfg, params['embed']).items()
         if v is not None}
  token = np.asarray(params['embed']['token'])
  expected = {}
  if mode == 'per_tower':
    expected = {'input_t0': token[0], 'input_t1': token[1]}
    expected['output'] = token.mean(0) if tied else np.asarray(params['embed']['output'])
  elif tied:
    expected = {'table': token}  # projected: V x N*H, shared: V x H
  else:
    expected = {'input': token, 'output': np.asarray(params['embed']['output'])}
  assert sorted(got) == sorted(expected)
  for name, m in expected.items():
    np.testing.assert_allclose(got[name], m, rtol=1e-6)
  if mode == 'projected':
    assert got.get('table', got.get('input')).shape[1] == 2 * model.cfg.d_model


def _fake_run(workdir, seed, tied, digest='a', vocab=200, width=16, grad=()):
  """A TableRun without a checkpoint: the pairing and labelling logic alone."""
  config = tiny_config('/nonexistent', **{'train.seed': seed, 'model.embedding.tied': tied})
  rng = np.random.default_rng(seed)
  mats = ({'table': rng.normal(size=(vocab, width))} if tied else
          {'input': rng.normal(size=(vocab, width)), 'output': rng.normal(size=(vocab, width))})
  return token_tables.TableRun(str(workdir), 10, config, digest, np.full(vocab, 50), mats)


def test_pairs_and_the_seed_reference(tmp_path):
  runs = [_fake_run(tmp_path / 'tied', 0, True), _fake_run(tmp_path / 'u0', 0, False),
          _fake_run(tmp_path / 'u1', 1, False)]
  res = token_tables.compare_runs(runs, min_count=20, n_boot=10)
  names = {(p['run_a'], p['matrix_a'], p['run_b'], p['matrix_b']): p['seed_reference']
           for p in res['pairs']}
  assert names == {
      (0, 'table', 1, 'input'): False, (0, 'table', 1, 'output'): False,
      (0, 'table', 2, 'input'): False, (0, 'table', 2, 'output'): False,
      (1, 'input', 1, 'output'): False, (2, 'input', 2, 'output'): False,
      (1, 'input', 2, 'input'): True, (1, 'output', 2, 'output'): True,
      (1, 'input', 2, 'output'): False, (1, 'output', 2, 'input'): False}
  assert res['n_tokens'] == 200 - 5  # the special ids are left out
  path = report.write(str(tmp_path / 'out'), res)
  text = open(path).read()
  assert 'untied seed 0: input ~ untied seed 1: input | yes' in text
  assert os.path.exists(tmp_path / 'out' / 'figures' / 'alignment.png')


def test_runs_with_different_tokenizers_are_refused(tmp_path):
  runs = [_fake_run(tmp_path / 'a', 0, True), _fake_run(tmp_path / 'b', 1, True, digest='b')]
  with pytest.raises(token_tables.AlignError, match='is not the tokenizer of'):
    token_tables.compare_runs(runs)


def test_gradient_ratio_uses_the_output_matrix_of_an_untied_run():
  tied = {'step': [1, 2], 'embed_grad_norm_input': [1.0, 2.0],
          'embed_grad_norm_output': [3.0, 2.0],
          'embed_grad_norm_output_matrix': [float('nan')] * 2}
  untied = dict(tied, embed_grad_norm_output=[0.0, 0.0], embed_grad_norm_output_matrix=[4.0, 1.0])
  np.testing.assert_allclose(report.grad_ratio(tied)[1], [3.0, 1.0])
  np.testing.assert_allclose(report.grad_ratio(untied)[1], [4.0, 0.5])
  assert report.ratio_summary(untied) == (4.0, 0.5)


@pytest.mark.slow
def test_align_command_on_trained_runs(tmp_path, small_corpus_dir):
  """Three tiny runs sharing one tokenizer (tied, untied seeds 0 and 1) through the command;
  a fourth with its own tokenizer is refused in one line."""
  from twotower_jax.train import loop  # pylint: disable=g-import-not-at-top
  base = {'train.steps': 4, 'train.checkpoint_every': 4, 'train.eval_every': 4,
          'data.vocab_size': 256}
  dirs = []
  for name, extra in (('tied', {}), ('untied0', {'model.embedding.tied': False}),
                      ('untied1', {'model.embedding.tied': False, 'train.seed': 1})):
    d = tmp_path / name
    if dirs:  # one tokenizer file for all: copied before the first step
      os.makedirs(d)
      shutil.copy(os.path.join(dirs[0], workdir_lib.TOKENIZER), d / workdir_lib.TOKENIZER)
    loop.train_and_evaluate(tiny_config(small_corpus_dir, **base, **extra), str(d))
    dirs.append(str(d))
  out = tmp_path / 'align'
  proc = run_module('twotower_jax.align', *dirs, f'--out={out}', '--min_count=1', '--n_boot=20')
  assert proc.returncode == 0, proc.stderr
  result = json.load(open(out / report.ALIGNMENT_JSON))
  refs = [p for p in result['pairs'] if p['seed_reference']]
  assert {(p['matrix_a'], p['matrix_b']) for p in refs} == {('input', 'input'),
                                                            ('output', 'output')}
  assert all(len(r['grad_norms']['step']) == 4 for r in result['runs'])
  assert all(np.isfinite(r['grad_norms']['embed_grad_norm_output_matrix']).all()
             for r in result['runs'] if not r['tied'])
  assert os.path.exists(out / 'figures' / 'gradient_dominance.png')
  other = tmp_path / 'other'
  loop.train_and_evaluate(tiny_config(small_corpus_dir, **dict(base, **{'data.vocab_size': 300})),
                          str(other))
  proc = run_module('twotower_jax.align', dirs[0], str(other), f'--out={tmp_path / "x"}')
  assert proc.returncode == 2
  assert proc.stderr.strip().count('\n') == 0 and 'is not the tokenizer of' in proc.stderr
  assert not os.path.exists(tmp_path / 'x')
