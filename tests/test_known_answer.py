"""The validation's plan and verdicts (fast): the ladder's and the nulls' run configs, the
checks, the class weights, bad input. The end-to-end run is tests/test_validate.py (slow)."""

import math
import os

import numpy as np
import pytest

from conftest import file_config, run_module
from twotower_jax import config as config_lib
from twotower_jax.analysis import validation
from twotower_jax.analysis.validation import checks
from twotower_jax.analysis.validation import plan
from twotower_jax.analysis.validation import writeup
from twotower_jax.data import planted
from twotower_jax.train import setup as setup_lib

SETTINGS = validation.Settings(gate_steps=40, ladder=(1.0, 0.75, 0.5), tower_types=('causal',),
                               pieces_rung=0.9, replicates=2)


def test_plan_builds_the_ladder_and_the_nulls(tmp_path):
  runs = {r.name: r for r in plan.runs(file_config('planted'), str(tmp_path), SETTINGS)}
  # sources: w on syntax for tower 0, the reverse for tower 1
  for w, want in ((1.0, ('1,0', '0,1')), (0.75, ('0.75,0.25', '0.25,0.75')),
                  (0.5, ('0.5,0.5', '0.5,0.5'))):
    src = [runs[f'ladder/causal/w{w:.2f}/src{k}'].config for k in (0, 1)]
    assert tuple(c.data.planted_class_weights for c in src) == want
    assert all(c.model.n_towers == 1 and c.train.steps == 900 for c in src)
    assert src[0].train.seed != src[1].train.seed
    gate, joint = (runs[f'ladder/causal/w{w:.2f}/{m}'] for m in ('gate', 'joint'))
    assert gate.config.model.init_towers == joint.config.model.init_towers == ','.join(
        f'{tmp_path}/ladder/causal/w{w:.2f}/src{k}:0' for k in (0, 1))
    assert (gate.config.model.gate, gate.config.train.trainable, gate.config.model.dropout) == (
        'latent', plan.TRAINABLE, 0.0)
    assert (joint.config.model.gate, joint.config.train.trainable) == ('concat', '')
    assert gate.config.train.steps == joint.config.train.steps == 40
    assert gate.composed and not runs[f'ladder/causal/w{w:.2f}/src0'].composed
  pieces = runs['ladder/pieces/w0.90/src0'].config
  words = file_config('planted').data.vocab_size
  assert pieces.data.tokenizer_type == 'unigram' and pieces.data.vocab_size == words // 3
  assert 'ladder/pieces/w0.90/joint' not in runs
  # nulls: own corpus per replicate, three sources, two composed models
  r0, r1 = runs['nulls/r00/seeds'], runs['nulls/r01/quality']
  assert r0.sources == ('nulls/r00/a', 'nulls/r00/b')
  assert r1.sources == ('nulls/r01/a', 'nulls/r01/short')
  assert runs['nulls/r01/short'].config.train.steps == 150  # 900 // 6
  assert runs['nulls/r00/a'].config.data.planted_class_weights == ''
  assert (runs['nulls/r00/a'].config.data.planted_seed !=
          runs['nulls/r01/a'].config.data.planted_seed)
  assert runs['nulls/r00/a'].tokenizer != runs['nulls/r01/a'].tokenizer
  assert all(r.config.analysis.primary == 'resample/planted' for r in runs.values())
  for r in runs.values():
    setup_lib.check_config(r.config)
  names = list(runs)
  for r in runs.values():  # every source comes before the model composed from it
    assert all(names.index(s) < names.index(r.name) for s in r.sources)


@pytest.mark.parametrize('field,value,match', [
    ('data.source', 'sotu', 'needs the planted language'),
    ('data.planted_loss_class', 'syntax', 'sets data.planted_loss_class'),
    ('train.trainable', '^gate/', 'sets data.planted_loss_class'),
])
def test_plan_refuses_configs_it_cannot_use(tmp_path, field, value, match):
  c = file_config('planted')
  config_lib.set_fields(c, {field: value})
  with pytest.raises(plan.ValidationError, match=match):
    plan.runs(c, str(tmp_path), SETTINGS)


@pytest.mark.parametrize('change,match', [
    ({'ladder': (1.0, 0.75)}, '0.5'), ({'ladder': (1.2, 0.5)}, 'in \\[0.5, 1\\]'),
    ({'alpha': 5.0}, 'alpha'), ({'max_fpr': float('nan')}, 'max_fpr'),
    ({'replicates': -1}, 'replicates'), ({'pieces_rung': 0.3}, 'pieces_rung'),
])
def test_plan_refuses_bad_settings(tmp_path, change, match):
  settings = validation.Settings(**{**SETTINGS.__dict__, **change})
  with pytest.raises(plan.ValidationError, match=match):
    plan.runs(file_config('planted'), str(tmp_path), settings)


def test_class_weights_weigh_each_class():
  c = file_config('planted')
  c.data.planted_class_weights = '0.75,0.25'

  class Words:  # a word tokenizer over the planted words (one piece per word)
    def __init__(self, words):
      self.words = ['<pad>', '</s>'] + ['\u2581' + w for w in words]
    def get_piece_size(self):
      return len(self.words)
    def encode(self, word):
      return [self.words.index('\u2581' + word)]
    def id_to_piece(self, i):
      return self.words[i]
    def is_control(self, i):
      return i < 2
    is_unknown = is_unused = lambda self, i: False

  lang = planted.language(c.data)
  sp = Words(list(lang.word_class))
  w = planted.target_weights(c.data, sp)
  cls = planted.piece_classes(c.data, sp)
  assert np.all(w[cls == planted.SYNTAX] == 0.75) and np.all(w[cls == planted.TOPIC] == 0.25)
  assert np.all(w[:2] == 0)
  c.data.planted_class_weights = ''
  assert planted.target_weights(c.data, sp) is None


@pytest.mark.parametrize('value', ['0.9', '1.2,0', 'a,b', '0,0'])
def test_bad_class_weights_are_one_line_errors(value):
  c = file_config('planted')
  c.data.planted_class_weights = value
  with pytest.raises(config_lib.ConfigError, match='planted_class_weights'):
    planted.check(c.data)


def _rung(w, strength, lo, hi, p, auc=0.9):
  return {'w': w, 'strength': strength, 'strength_ci': [lo, hi], 'auc': auc, 'ci': [0.8, 1.0],
          'p': p, 'split': p < 0.05}


def test_split_strength_is_the_weaker_lean():
  block = {'test': {'lean_positive': {'n': 30, 'share_positive': 0.9, 'share_negative': 0.1},
                    'lean_negative': {'n': 20, 'share_positive': 0.4, 'share_negative': 0.6}}}
  strength, (lo, hi) = checks.split_strength(block)
  assert strength == pytest.approx(0.6)  # the topic items' lean to tower 1
  assert lo < 0.6 < hi < 0.9
  # one tower better at everything: topic items lean to tower 0 as well
  block['test']['lean_negative'].update(share_positive=0.95, share_negative=0.05)
  assert checks.split_strength(block)[0] == pytest.approx(0.05)


def test_ladder_check_passes_a_rising_ladder_and_fails_what_it_should():
  good = [_rung(1.0, 0.95, 0.85, 1.0, 1e-4), _rung(0.75, 0.8, 0.65, 0.9, 0.001),
          _rung(0.5, 0.45, 0.3, 0.6, 0.6)]
  assert checks.judge_ladder('l', good, 0.05)['passed']
  # a dip within the intervals is allowed
  dip = [_rung(1.0, 0.8, 0.7, 0.9, 1e-4), _rung(0.75, 0.85, 0.75, 0.95, 1e-4), good[2]]
  assert checks.judge_ladder('l', dip, 0.05)['passed']
  falls = [_rung(1.0, 0.7, 0.65, 0.75, 1e-4), _rung(0.75, 0.95, 0.9, 1.0, 1e-4), good[2]]
  res = checks.judge_ladder('l', falls, 0.05)
  assert not res['passed'] and 'falls from w=0.75 to w=1' in res['why']
  flat = [_rung(1.0, 0.6, 0.4, 0.8, 0.3), good[2]]
  assert 'does not lie above' in checks.judge_ladder('l', flat, 0.05)['why']
  split_at_half = good[:2] + [_rung(0.5, 0.45, 0.3, 0.6, 0.01)]
  res = checks.judge_ladder('l', split_at_half, 0.05)
  assert not res['passed'] and 'reports a split at w=0.5' in res['why']
  missing = good[:2] + [_rung(0.5, math.nan, math.nan, math.nan, math.nan)]
  assert not checks.judge_ladder('l', missing, 0.05)['passed']
  # joint: a split at w = 0.5 is reported, not failed; every w > 0.5 needs one
  joint = good[:2] + [_rung(0.5, 0.7, 0.55, 0.85, 0.001)]
  assert checks.judge_ladder('l', joint, 0.05, 'joint')['passed']
  weak = [good[0], _rung(0.75, 0.6, 0.45, 0.75, 0.2), good[2]]
  res = checks.judge_ladder('l', weak, 0.05, 'joint')
  assert not res['passed'] and 'no split beyond 0.5 at w = [0.75]' in res['why']
  # the SentencePiece rung: its interval above 0.5
  assert checks.judge_ladder('p', [_rung(0.9, 0.8, 0.6, 0.9, 0.01)], 0.05)['passed']
  assert not checks.judge_ladder('p', [_rung(0.9, 0.6, 0.45, 0.8, 0.2)], 0.05)['passed']


def test_null_check_counts_false_positives_with_an_interval():
  ok = checks.judge_null('null/seeds/probe', [0.5] * 18 + [0.01, 0.2], 0.05, 0.10)
  assert ok['passed'] and ok['rejections'] == 1 and ok['fpr'] == 0.05
  assert ok['fpr_ci'][0] < 0.05 < ok['fpr_ci'][1]
  bad = checks.judge_null('null/quality/gate', [0.01] * 3 + [0.5] * 17, 0.05, 0.10)
  assert not bad['passed'] and bad['fpr'] == 0.15
  assert not checks.judge_null('x', [], 0.05, 0.1)['passed']


def _summary(est, auc, p, control_p=(), share=0.9):
  test = {'lean_positive': {'n': 40, 'share_positive': share, 'share_negative': 1 - share},
          'lean_negative': {'n': 40, 'share_positive': 1 - share, 'share_negative': share}}
  return {'per_estimator': {est: {'planted': {'auc': auc, 'ci': [auc - 0.1, auc + 0.05], 'p': p,
                                              'control_p': list(control_p), 'test': test}}}}


def test_checks_from_results_group_by_ladder_and_null():
  results = [{'group': {'kind': 'ladder', 'tower_type': 'causal', 'tokens': 'word', 'w': w,
                        'mode': 'gate'}, 'summary': _summary('probe', auc, p, share=share)}
             for w, auc, p, share in ((1.0, 0.95, 1e-4, 1.0), (0.5, 0.5, 0.5, 0.5))]
  results += [{'group': {'kind': 'null', 'null': null, 'replicate': r},
               'summary': _summary('probe', 0.5, 0.5 if r else 0.01, [0.3, 0.02])}
              for r in range(4) for null in ('seeds', 'quality')]
  out = {c['name']: c for c in checks.ladder_checks(results, ['probe', 'gate'], 0.05) +
         checks.null_checks(results, ['probe'], 0.05, 0.1)}
  assert set(out) == {'ladder/causal/gate/probe', 'null/seeds/probe', 'null/quality/probe',
                      'null/shuffled/probe'}
  assert out['ladder/causal/gate/probe']['passed']
  assert out['null/seeds/probe']['fpr'] == 0.25 and not out['null/seeds/probe']['passed']
  assert out['null/shuffled/probe']['n'] == 16 and out['null/shuffled/probe']['fpr'] == 0.5
  marked = {c['name']: c['required'] for c in checks.mark_required(list(out.values()), 'probe')}
  assert all(marked.values())
  marked = {c['name']: c['required'] for c in checks.mark_required(list(out.values()), 'gate')}
  assert not any(marked.values())  # 'gate' is not the probe: every check secondary


def test_markdown_and_figures(tmp_path):
  ladder = checks.judge_ladder('ladder/causal/gate/probe',
                               [_rung(1.0, 0.95, 0.9, 1.0, 1e-4), _rung(0.5, 0.5, 0.4, 0.6, 0.5)],
                               0.05)
  assert ladder['passed']
  null = checks.judge_null('null/seeds/probe', [0.2, 0.6, 0.01, 0.9], 0.05, 0.1)
  other = dict(checks.judge_null('null/seeds/gate', [0.01, 0.02, 0.5, 0.9], 0.05, 0.1),
               required=False)
  result = {'passed': False, 'failed': [null['name']], 'alpha': 0.05, 'max_fpr': 0.1,
            'primary': 'probe/planted', 'secondary_failed': [other['name']],
            'checks': [ladder, dict(null, required=True), other],
            'runs': {'ladder/causal/w1.00/src0': {'step': 900, 'eval': {'loss': 1.9,
                                                                         'loss_all': 4.0},
                                                  'train_wall_s': 10.0, 'train_cpu_s': 9.0}}}
  writeup.write(str(tmp_path), result)
  text = open(tmp_path / 'validation.md').read()
  assert 'FAILED: null/seeds/probe' in text
  assert '| causal/gate | probe | 1: 0.95 [0.90, 1.00], 0.90, p 0.0001 split; 0.5: 0.50' in text
  assert '| seeds | probe | 1/4 | 0.250 [' in text and '| FAIL |' in text
  assert '| seeds | gate | 2/4 | 0.500 [' in text and '| fail (secondary) |' in text
  assert 'Required: the checks of `probe`' in text
  assert 'Secondary checks failed: null/seeds/gate.' in text
  assert '| ladder/causal/w1.00/src0 | 900 | 1.900 | 4.000 | 10 / 9 |' in text
  for name in ('ladder', 'calibration'):
    assert f'](figures/{name}.png)' in text
    assert os.path.getsize(tmp_path / 'figures' / f'{name}.png') > 1000


def test_validate_command_refuses_a_non_planted_config(tmp_path):
  proc = run_module('twotower_jax.validate', f'--workdir={tmp_path}/v',
                    '--config=configs/default.py')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: validate needs the planted')
  assert not os.path.exists(tmp_path / 'v')


@pytest.mark.parametrize('args,match', [
    (['--alpha=5'], 'alpha'), (['--max_fpr=nan'], 'max_fpr'),
    (['--ladder=1,x'], 'give numbers'), (['--tower_types=lstm'], 'registered tower types'),
])
def test_validate_command_checks_its_flags_before_work(tmp_path, args, match):
  proc = run_module('twotower_jax.validate', f'--workdir={tmp_path}/v', *args)
  assert proc.returncode == 2 and match in proc.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / 'v')


def test_validate_refuses_a_training_workdir_or_a_file(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{}')
  proc = run_module('twotower_jax.validate', f'--workdir={run}')
  assert proc.returncode == 2 and 'holds a training run' in proc.stderr
  assert sorted(os.listdir(run)) == ['config.json']
  f = tmp_path / 'file'
  f.write_text('x')
  proc = run_module('twotower_jax.validate', f'--workdir={f}')
  assert proc.returncode == 2 and 'is a file' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
