"""Experiments of named variants with the loss aggregation (configs/experiments/pondering.py):
the variant axis, its bad input, the arithmetic of loss.py, and (slow) a 2 x 2 run of it."""

import json
import os

import ml_collections
import numpy as np
import pytest
from scipy import stats

from conftest import REPO
from twotower_jax import cli
from twotower_jax import experiment
from twotower_jax.experiment import loss
from twotower_jax.experiment import spec as spec_lib

PONDERING = 'configs/experiments/pondering.py'


def _load(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(':')
  return cli.check_config_file(os.path.join(REPO, path) + (f':{arg}' if arg else ''))


def test_pondering_variants_are_points_with_their_overrides_vanilla_first():
  points = spec_lib.points(_load(f'{PONDERING}:cpu'))
  variants = ['vanilla', 'ponder1', 'ponder2', 'ponder3', 'layers4', 'layers7']
  assert [p.name for p in points] == [f'{v}_seed{s}' for v in variants for s in (0, 1)]
  by = {p.name: p.config for p in points}
  assert [by[f'ponder{s}_seed0'].model.pondering.steps for s in (1, 2, 3)] == [1, 2, 3]
  assert [by[f'{v}_seed1'].model.n_layers for v in ('vanilla', 'ponder3', 'layers4',
                                                    'layers7')] == [2, 2, 4, 7]
  assert {(c.model.n_towers, c.mesh.tower, c.model.d_model, c.train.steps)
          for c in by.values()} == {(1, 1, 64, 1200)}
  assert by['ponder2_seed1'].train.seed == 1 and by['vanilla_seed1'].model.pondering.steps == 0
  assert {p.values['variant'] for p in points} == set(variants) and points[0].group == 'vanilla'
  assert [p.name for p in spec_lib.points(_load(f'{PONDERING}:paper'))][-1] == 'layers31_seed1'


def _variants(**sets) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(sets, sort_keys=False)


@pytest.mark.parametrize('fields,message', [
    ({'variants': _variants(a={}, b={'model': {'n_layerz': 3}})},
     'variants.b.model.n_layerz: model.n_layerz is not a field of the run config; did you mean '
     'model.n_layers?'),
    ({'variants': _variants(**{'a b': {}})}, "variants ['a b']: name each variant"),
    ({'aggregation': 'mean'}, "aggregation='mean' is unknown; use one of deferral, loss, preference, tying"),
    ({'analyse': False, 'aggregation': 'preference'}, 'analyse=False trains the points only'),
    ({'over_training': True}, 'analyse=False trains the points only'),
    ({'group_by': 'model.n_layers'}, "group_by='model.n_layers' is not one of the axes "
                                     '(variant, train.seed)'),
])
def test_bad_variant_experiments_are_one_line_errors(fields, message):
  exp = _load(f'{PONDERING}:cpu')
  for key, value in fields.items():
    exp[key] = value
  with pytest.raises(spec_lib.ExperimentError) as e:
    spec_lib.points(exp)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_t_interval_and_reading_a_curve_between_evals():
  t = loss.t_interval([3.0, 3.2, 3.7])
  half = stats.t.ppf(0.975, 2) * np.std([3.0, 3.2, 3.7], ddof=1) / np.sqrt(3)
  assert t['mean'] == pytest.approx(3.3) and t['ci'] == pytest.approx([3.3 - half, 3.3 + half])
  assert np.isnan(loss.t_interval([3.0])['ci'][0]) and loss.t_interval([])['n'] == 0
  curve = [[10, 5.0], [20, 4.0], [40, 3.0]]
  assert loss.loss_at(curve, 15) == pytest.approx(4.5)
  assert loss.loss_at(curve, 30) == pytest.approx(3.5) and loss.loss_at(curve, 40) == 3.0
  assert np.isnan(loss.loss_at(curve, 5)) and np.isnan(loss.loss_at(curve, 41))


def test_differences_pair_the_points_of_the_same_seed():
  def rec(name, seed, value):
    return {'name': name, 'values': {'variant': name[:1], 'train.seed': seed}, 'x': value}
  ref = [rec('a0', 0, 3.0), rec('a1', 1, 4.0)]
  other = [rec('b1', 1, 3.5), rec('b0', 0, 2.0)]  # out of order: paired by seed, not position
  d = loss._paired(other, ref, 'x', 'variant')  # pylint: disable=protected-access
  assert d['pairs'] == [['b1', 'a1'], ['b0', 'a0']] and d['values'] == [-0.5, -1.0]
  assert d['mean'] == pytest.approx(-0.75)


@pytest.mark.slow
def test_a_variant_experiment_runs_and_compares_at_equal_tokens_and_flops(tmp_path):
  from conftest import SMALL_SPEECHES  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from twotower_jax.data import sotu  # pylint: disable=import-outside-toplevel
  for name in SMALL_SPEECHES:
    shutil.copy(os.path.join(sotu.sotu_speech_dir(), name + '.txt'), tmp_path / (name + '.txt'))
  exp = _load(f'{PONDERING}:cpu')
  exp.variants = _variants(vanilla={}, ponder1={'model': {'pondering': {'steps': 1}}})
  exp.overrides.data = ml_collections.ConfigDict({
      'source': 'text', 'text_glob': str(tmp_path / '*.txt'), 'val_fraction': 0.25,
      'vocab_size': 256, 'seq_len': 32})
  exp.overrides.model = ml_collections.ConfigDict({'n_towers': 1, 'd_model': 32, 'n_heads': 2,
                                                   'd_mlp': 64, 'max_len': 32})
  exp.overrides.train = ml_collections.ConfigDict({
      'steps': 8, 'batch_size': 8, 'log_every': 2, 'eval_every': 2, 'eval_batches': 2,
      'checkpoint_every': 8, 'keep_checkpoints': 1})
  exp.overrides.optimizer.warmup_steps = 2
  points = spec_lib.points(exp)
  root = str(tmp_path / 'exp')
  prov = experiment.provenance(f'{PONDERING}:cpu', {})
  res = experiment.run_all(root, exp, points, prov)
  assert list(res['groups']) == ['vanilla', 'ponder1'] and res['settings']['reference'] == 'vanilla'
  by = {p['name']: p for p in res['points']}
  plain, ponder = by['vanilla_seed0'], by['ponder1_seed0']
  assert ponder['params'] == plain['params'] and ponder['flops_per_step'] > 2 * plain['flops_per_step']
  assert res['settings']['budget_flops'] == plain['flops_per_step'] * 8
  assert ponder['budget_step'] == pytest.approx(8 * plain['flops_per_step'] / ponder['flops_per_step'])
  assert ponder['loss_at_budget'] == pytest.approx(loss.loss_at(ponder['eval_curve'],
                                                                ponder['budget_step']))
  assert plain['loss_at_budget'] == plain['final_loss'] == plain['eval_curve'][-1][1]
  g = res['groups']['ponder1']
  assert g['final_loss_vs_reference']['pairs'] == [['ponder1_seed0', 'vanilla_seed0'],
                                                   ['ponder1_seed1', 'vanilla_seed1']]
  assert g['final_loss_vs_reference']['mean'] == pytest.approx(
      np.mean([by[f'ponder1_seed{s}']['final_loss'] - by[f'vanilla_seed{s}']['final_loss']
               for s in (0, 1)]))
  assert not os.path.exists(os.path.join(root, 'vanilla_seed0', 'analysis'))  # trained only
  with open(os.path.join(root, 'results.md')) as f:
    text = f.read()
  assert '| ponder1 | 2 |' in text and 'eval loss at equal FLOPs' in text
  assert os.path.exists(os.path.join(root, 'figures', 'loss.png'))
  before = json.dumps(res, sort_keys=True)
  again = experiment.run_all(root, exp, points, prov)  # every point kept, the same answer
  assert json.dumps(again, sort_keys=True) == before


TYING = 'configs/experiments/tying.py'


def test_tying_points_share_one_vocabulary_and_bad_sharing_is_refused():
  exp = _load(f'{TYING}:cpu')
  points = spec_lib.points(exp)
  assert [p.name for p in points][:4] == ['tied_seed0', 'tied_seed1', 'untied_seed0',
                                         'untied_seed1']
  emb = {p.name: p.config.model.embedding for p in points}
  assert (emb['untied_seed1'].tied, emb['tied_scale5_seed0'].input_grad_scale) == (False, 5.0)
  assert {p.config.analysis.lens for p in points} == {True}
  exp.variants.untied.data = ml_collections.ConfigDict({'vocab_size': 1000})
  with pytest.raises(spec_lib.ExperimentError, match='shared_tokenizer=True needs one '
                     'data.vocab_size and data.tokenizer_type for every point'):
    spec_lib.points(exp)


def _tiny_corpus(tmp_path) -> str:
  from conftest import SMALL_SPEECHES  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from twotower_jax.data import sotu  # pylint: disable=import-outside-toplevel
  for name in SMALL_SPEECHES:
    shutil.copy(os.path.join(sotu.sotu_speech_dir(), name + '.txt'), tmp_path / (name + '.txt'))
  return str(tmp_path / '*.txt')


def _tiny(exp, text_glob: str, steps: int) -> None:
  exp.overrides.data = ml_collections.ConfigDict({
      'source': 'text', 'text_glob': text_glob, 'val_fraction': 0.25, 'vocab_size': 256,
      'seq_len': 32})
  exp.overrides.model = ml_collections.ConfigDict({'n_towers': 1, 'd_model': 32, 'n_heads': 2,
                                                   'd_mlp': 64, 'max_len': 32})
  exp.overrides.train = ml_collections.ConfigDict({
      'steps': steps, 'batch_size': 8, 'log_every': 1, 'eval_every': 2, 'eval_batches': 2,
      'checkpoint_every': steps, 'keep_checkpoints': 1})
  exp.overrides.optimizer.warmup_steps = 2


@pytest.mark.slow
def test_a_tying_experiment_shares_its_tokenizer_and_measures_the_bias(tmp_path):
  exp = _load(f'{TYING}:cpu')
  exp.variants = _variants(tied={'model': {'embedding': {'tied': True}}},
                           untied={'model': {'embedding': {'tied': False}}})
  _tiny(exp, _tiny_corpus(tmp_path), 10)
  exp.overrides.analysis.lens_windows = 16
  exp.overrides.analysis.min_count = 3
  exp.n_boot = 20
  points = spec_lib.points(exp)
  root = tmp_path / 'exp'
  res = experiment.run_all(str(root), exp, points, experiment.provenance(f'{TYING}:cpu', {}))
  digests = {(root / p.name / 'tokenizer.model').read_bytes() for p in points}
  assert digests == {(root / 'tokenizer.model').read_bytes()}  # one tokenizer for all
  assert list(res['groups']) == ['tied', 'untied'] and not res['groups']['untied']['tied']
  bias = res['groups']['tied']['bias']
  assert set(bias) == {'cka', 'knn', 'procrustes', 'row_cosine'} and bias['cka']['n'] == 2
  by = {p['name']: p for p in res['points']}
  t0 = by['tied_seed0']
  assert t0['bias']['cka'] == pytest.approx(t0['to_output']['cka'] - t0['to_input']['cka'])
  # The seed pairs: tied table ~ table, untied input ~ input and output ~ output.
  assert [r['pair'] for r in res['seed_reference']] == [
      'tied seed 0: table ~ tied seed 1: table', 'untied seed 0: input ~ untied seed 1: input',
      'untied seed 0: output ~ untied seed 1: output']
  lens = res['groups']['tied']['lens']
  assert lens['n'] == 2 and len(lens['kl']) == len(lens['layers']) == 3  # embedding + 2 layers
  assert lens['contribution'][0]['n'] == 0 and [k['n'] for k in lens['kl']] == [2, 2, 2]
  assert lens['kl'][1]['mean'] == pytest.approx(np.mean(
      [by[f'tied_seed{s}']['lens']['kl'][1] for s in (0, 1)]))
  assert np.isfinite(by['untied_seed1']['grad_ratio']['early'])
  for name in ('results.md', 'alignment/alignment.md', 'alignment/alignment.json'):
    assert (root / name).exists(), name


DEFERRAL = 'configs/experiments/deferral.py'


def test_a_point_names_an_earlier_variants_workdir():
  exp = _load(f'{DEFERRAL}:cpu')
  points = spec_lib.points(exp)
  gated = points[6]
  assert gated.name == 'gated_seed0'
  assert [p.name for p in spec_lib.references(gated, points)] == ['old_seed0', 'new_seed0']
  resolved = spec_lib.resolve(gated, points, '/x/exp')
  assert resolved.config.model.init_towers == '/x/exp/old_seed0,/x/exp/new_seed0'
  assert gated.config.model.init_towers == '{point:old},{point:new}'  # the record stays DIR-free
  assert spec_lib.references(points[0], points) == []
  extra = spec_lib.extra_analyses(points[2], exp)
  assert list(extra) == ['old', 'new'] and extra['new'].analysis.eval_documents.startswith('^(194')
  assert extra['old'].model == points[2].config.model


@pytest.mark.parametrize('edit,message', [
    (lambda e: e.variants.gated.model.update({'init_towers': '{point:nope},{point:new}'}),
     'names {point:nope}, which is no variant of this experiment'),
    (lambda e: e.variants.old.update({'model': {'init_towers': '{point:gated}'}}),
     'names gated_seed0, which comes later; list variant gated before old'),
    (lambda e: e.analyses.update({'a b': {'eval_documents': 'x'}}), 'analyses.a b: name each'),
    (lambda e: e.analyses.old.update({'eval_documentz': 'x'}),
     'analyses.old.analysis.eval_documentz: analysis.eval_documentz is not a field'),
    (lambda e: e.analyses.old.update({'n_perm': 19}),
     'point both_seed0, analyses.old: analysis.n_perm=19 must be an integer >= 99'),
])
def test_bad_references_and_analyses_are_one_line_errors(edit, message):
  exp = _load(f'{DEFERRAL}:cpu')
  edit(exp)
  with pytest.raises(spec_lib.ExperimentError) as e:
    spec_lib.points(exp)
  assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.slow
def test_a_deferral_experiment_composes_its_experts_and_scores_each_domain(tmp_path):
  exp = _load(f'{DEFERRAL}:cpu')
  exp.axes.train.seed = '0'
  exp.overrides.data = ml_collections.ConfigDict({'vocab_size': 256, 'seq_len': 32})
  exp.overrides.model.update({'d_model': 32, 'n_heads': 2, 'd_mlp': 64, 'max_len': 32})
  exp.overrides.train.update({'steps': 6, 'batch_size': 8, 'log_every': 2, 'eval_every': 3,
                              'eval_batches': 2, 'checkpoint_every': 6})
  exp.overrides.optimizer.warmup_steps = 2
  exp.variants.gated.train.update({'steps': 4, 'eval_every': 2, 'checkpoint_every': 4})
  exp.variants.gated.optimizer.warmup_steps = 1
  for name in ('old', 'new'):
    exp.analyses[name].update({'eval_windows': 8, 'min_count': 2, 'n_boot': 20, 'n_perm': 99,
                               'n_control': 9, 'token_view_passages': 1})
  points = spec_lib.points(exp)
  root = str(tmp_path / 'exp')
  prov = experiment.provenance(f'{DEFERRAL}:cpu', {})
  with pytest.raises(spec_lib.ExperimentError, match='starts from point old_seed0, which is '
                     r'not finished; run it first \(--point=1\)'):
    experiment.run_point(root, exp, points, 3, prov)
  assert not os.path.exists(os.path.join(root, 'gated_seed0'))
  res = experiment.run_all(root, exp, points, prov)
  assert list(res['groups']) == ['both', 'old', 'new', 'gated']
  gated = res['groups']['gated']
  assert gated['experts'] == ['old', 'new']
  for domain in ('old', 'new'):
    cell = gated['domains'][domain]
    shares = [cell['share'][e]['mean'] for e in ('old', 'new')]
    assert sum(shares) == pytest.approx(1.0) and np.isfinite(cell['argmax_loss']['mean'])
    assert 'share' not in res['groups']['old']['domains'][domain]  # one tower: no deferral
    assert cell['minus_old']['n'] == 1
  by = {p['name']: p for p in res['points']}
  old_on_new = by['old_seed0']['domains']['new']
  assert old_on_new['documents'] > 0 and np.isfinite(old_on_new['eval_loss'])
  follows = gated['follows_domain']['old']['new']['mean']
  assert follows == pytest.approx(by['gated_seed0']['domains']['old']['gate']['chosen'][0] -
                                  by['gated_seed0']['domains']['new']['gate']['chosen'][0])
  with open(os.path.join(root, 'results.md')) as f:
    assert 'gated: deferral' in f.read()
