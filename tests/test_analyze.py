"""Analysis: estimators on a tiny trained checkpoint, segment sums, planted case, CLI."""

import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _family
from tests.conftest import run_module, tiny_config
from twotower_jax.train import setup as setup_lib
from twotower_jax import run as run_lib
from twotower_jax.analysis import runner as analysis
from twotower_jax.analysis import summary as summary_lib
from twotower_jax.analysis.estimators import probe
from twotower_jax.train import checkpoints
from twotower_jax.analysis import estimators as est_lib
from twotower_jax.model import gates
from twotower_jax.data import planted
from twotower_jax.train import loop as train_lib

PLANTED_IDS = np.arange(5, 45)  # low SentencePiece ids: frequent pieces


def analysis_config(text_dir, **overrides):
  c = tiny_config(text_dir, **{'train.steps': 30, 'train.checkpoint_every': 30,
                               'train.eval_every': 30, 'train.log_every': 10, **overrides})
  c.analysis.eval_windows = 16
  c.analysis.probe_steps = 40
  c.analysis.probe_warmup = 10
  c.analysis.probe_lr = 3e-3
  c.analysis.probe_batch_size = 8
  c.analysis.n_boot = 50
  c.analysis.min_count = 5
  return c


def trained(tmp_path_factory, text_dir, name, **overrides):
  workdir = str(tmp_path_factory.mktemp(name))
  config = analysis_config(text_dir, **overrides)
  train_lib.train_and_evaluate(config, workdir)
  config = analysis.load_config(workdir, config.analysis)
  restored = run_lib.restore(config, workdir)
  setup = restored.setup
  out = os.path.join(workdir, 'analysis')
  ctx = est_lib.Context(config=config, model=setup.model, params=restored.params,
                        eval_batches=est_lib.base.eval_batches(setup.splits.val_windows,
                                                               config.analysis.eval_windows,
                                                               config.train.batch_size),
                        train_windows=setup.splits.train_windows, analysis_dir=out,
                        step=restored.step)
  return workdir, config, setup, ctx


@pytest.fixture(scope='module')
def run(tmp_path_factory, small_corpus_dir):
  return trained(tmp_path_factory, small_corpus_dir, 'concat')


@pytest.fixture(scope='module')
def results(run):
  _, _, _, ctx = run
  before = checkpoints.fingerprints(ctx.params)
  out = {name: est_lib.base.score(ctx, name) for name in ('ablation', 'probe')}
  assert checkpoints.fingerprints(ctx.params) == before  # towers frozen, bit-identical
  return out


def test_segment_sums_match_numpy():
  rng = np.random.default_rng(0)
  n, p, v = 3, 500, 37
  vals = rng.normal(size=(n, p)).astype(np.float32)
  targets = rng.integers(0, v, size=p)
  mask = rng.random(p) > 0.2
  got = jax.device_get(est_lib.base.item_sums(jnp.asarray(vals), jnp.asarray(targets),
                                              jnp.asarray(mask), v, jax.random.PRNGKey(1)))
  count, sums, cross = np.zeros(v), np.zeros((n, v)), np.zeros((v, n, n))
  for i in np.nonzero(mask)[0]:
    count[targets[i]] += 1
    sums[:, targets[i]] += vals[:, i]
    cross[targets[i]] += np.outer(vals[:, i], vals[:, i])
  np.testing.assert_allclose(got['count_V'], count)
  np.testing.assert_allclose(got['sum_NxV'], sums, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got['cross_VxNxN'], cross, rtol=1e-5, atol=1e-4)
  # the control permutes towers per position: per-item totals over towers are unchanged
  np.testing.assert_allclose(got['perm_sum_KxNxV'][0].sum(0), sums.sum(0), rtol=1e-5, atol=1e-4)
  res = est_lib.base.finish({k: np.asarray(x, np.float64) for k, x in got.items()})
  item = int(np.argmax(count))
  occ = vals[:, mask & (targets == item)]
  d = occ[0] - occ[np.arange(1, n)].mean(0) if res['best'][item] == 0 else None
  if d is not None:
    np.testing.assert_allclose(res['pref'][item], d.mean(), rtol=1e-5)
    se = d.std(ddof=1) / np.sqrt(d.size)
    np.testing.assert_allclose(res['pref_hi'][item] - res['pref'][item], 1.959964 * se, rtol=1e-4)


@pytest.mark.slow
def test_estimators_shapes_counts_same_positions(run, results):
  _, config, setup, ctx = run
  vocab = setup.model.cfg.vocab_size
  targets = np.concatenate([w[:, 1:].ravel() for w in ctx.eval_batches])
  expected = np.bincount(targets[targets != 0], minlength=vocab)
  for name, res in results.items():
    assert res['mean_NxV'].shape == (2, vocab), name
    np.testing.assert_array_equal(res['count'], expected)  # the same positions for all
    assert res['n_positions'] == expected.sum()
    seen = res['count'] > 0
    assert np.all(np.isfinite(res['pref'][seen])) and np.all(np.isnan(res['pref'][~seen]))
  ab = results['ablation']
  assert np.all(np.isfinite(ab['extras']['shapley_t0'][expected > 0]))
  assert np.all(results['probe']['mean_NxV'][:, expected > 0] <= 0)  # log-likelihoods


@pytest.mark.slow
def test_probe_heads_saved_and_reused(run, results):
  del results
  _, _, _, ctx = run
  path = probe.probe_path(ctx.analysis_dir, ctx.step)
  assert os.path.exists(path)
  mtime = os.stat(path).st_mtime_ns
  again = est_lib.get('probe').prepare(ctx)
  assert os.stat(path).st_mtime_ns == mtime  # not retrained
  with np.load(path) as f:
    np.testing.assert_array_equal(np.asarray(again['params']['out_NxVxH']), f['out_NxVxH'])


@pytest.fixture(scope='module')
def cli_analysis(run, results):
  """The analysis command on the trained run (after `results` trained the probe heads)."""
  del results
  workdir = run[0]
  return workdir, run_module(
      'twotower_jax.analyze', f'--workdir={workdir}', '--config.analysis.eval_windows=16',
      '--config.analysis.probe_steps=40', '--config.analysis.probe_warmup=10',
      '--config.analysis.probe_lr=0.003', '--config.analysis.probe_batch_size=8', '--config.analysis.n_boot=50',
      '--config.analysis.min_count=5')


@pytest.mark.slow
def test_cli_writes_files_and_reuses_probe(cli_analysis):
  workdir, r = cli_analysis
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'reusing heads' in r.stderr
  out = os.path.join(workdir, 'analysis')
  with open(os.path.join(out, 'preference.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 256
  assert list(rows[0])[:5] == ['token_id', 'piece', 'count', 'word_class', 'upos']
  for col in ('probe_t0', 'probe_t1', 'probe_pref', 'probe_pref_lo', 'resample_pref_hi',
              'resample_shapley_t0', 'resample_shapley_t1'):
    assert col in rows[0]
  summary = json.load(open(os.path.join(out, 'summary.json')))
  assert summary['estimators'] == ['probe', 'resample']  # the default; gate skipped: concat
  assert summary['n_positions'] == sum(int(r['count']) for r in rows)
  pe = summary['per_estimator']['resample']
  assert pe['n_items'] > 0 and len(pe['top_items']['tower_0']) > 0
  assert 'probe~resample' in summary['agreement']
  view = json.load(open(os.path.join(out, 'token_view.json')))
  assert view['passages'] and len(view['passages'][0]['pieces']) == 32


def test_cli_missing_workdir_is_one_line(tmp_path):
  r = run_module('twotower_jax.analyze', f'--workdir={tmp_path / "nope"}')
  assert r.returncode == 2 and r.stderr.strip().startswith('error:')
  assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture
def planted_gate():
  """Registers the test gate for one test only (other tests list the registered gates)."""
  gates.register('planted_test', mixture=True)(_family.split_gate(PLANTED_IDS.tolist()))
  yield
  gates.GATES.pop('planted_test')


@pytest.mark.slow
def test_planted_items_rank_toward_tower_0(tmp_path_factory, small_corpus_dir, planted_gate):
  """Tower 1 cannot produce the planted items: the output-side estimators must lean them to
  tower 0. The probe reads what a tower's states encode, and after 30 steps both tiny towers'
  states mostly encode the current piece, so it has no answer to find here; its known-answer
  checks are tests/test_constructed_language.py and tests/test_validate.py."""
  _, config, _, ctx = trained(tmp_path_factory, small_corpus_dir, 'planted',
                              **{'model.gate': 'planted_test', 'optimizer.lr': 5e-3})
  assert config.model.gate == 'planted_test'
  from twotower_jax.analysis import stats  # pylint: disable=g-import-not-at-top
  got = {}
  for name in ('gate', 'ablation'):
    res = est_lib.base.score(ctx, name)
    keep = res['count'] >= 5
    planted = np.isin(np.arange(keep.size), PLANTED_IDS)
    got[name] = (stats.auc(res['pref'][keep], planted[keep]),
                 res['pref'][keep & planted].mean(), res['pref'][keep & ~planted].mean())
  print(got)
  for name, (auc, mean_planted, mean_rest) in got.items():
    assert mean_planted > 0 > mean_rest and auc > 0.7, (name, got[name])


@pytest.mark.slow
def test_one_tower_run_gets_split_unit_control(tmp_path, small_corpus_dir):
  """n_towers=1: ablation and gate are skipped; the probe splits the units into two halves."""
  from twotower_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  config = analysis_config(small_corpus_dir, **{'model.n_towers': 1, 'mesh.tower': 1})
  config.analysis.probe_steps = 3
  config.analysis.min_count = 1
  config.analysis.n_boot = 10
  assert analysis.estimator_names(config)[0] == ['probe']
  setup = setup_lib.build(config, str(tmp_path))
  params = state_lib.init(setup.model, optimizer_lib.make(config), 0).params
  out = str(tmp_path / 'analysis')
  summary = analysis.analyze(run_lib.Run(setup, params, 0), str(tmp_path), out)
  pe = summary['per_estimator']['probe']
  assert pe['control']['kind'] == 'split_single_tower' and pe['n_items'] > 0
  with open(os.path.join(out, 'preference.csv')) as f:
    assert 'probe_t1' in next(csv.reader(f))


def test_three_tower_run_scores_every_tower(tmp_path, small_corpus_dir):
  """n_towers=3: per-tower columns for each estimator; pref = best tower minus mean of the others."""
  from twotower_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  config = analysis_config(small_corpus_dir, **{'model.n_towers': 3, 'mesh.tower': 1})
  config.analysis.probe_steps = 3
  config.analysis.min_count = 1
  config.analysis.n_boot = 10
  setup = setup_lib.build(config, str(tmp_path))
  params = state_lib.init(setup.model, optimizer_lib.make(config), 0).params
  out = str(tmp_path / 'analysis')
  summary = analysis.analyze(run_lib.Run(setup, params, 0), str(tmp_path), out)
  assert summary['n_towers'] == 3
  assert set(summary['per_estimator']) == {'probe', 'resample'}
  with open(os.path.join(out, 'preference.csv')) as f:
    rows = [r for r in csv.DictReader(f) if int(r['count']) > 0]
  assert rows
  for name in ('probe', 'resample'):
    for r in rows:
      v = np.array([float(r[f'{name}_t{k}']) for k in range(3)])
      best = int(r[f'{name}_best'])
      assert best == int(np.argmax(v)), (name, r)
      expected = v[best] - np.delete(v, best).mean()
      np.testing.assert_allclose(float(r[f'{name}_pref']), expected, atol=1e-4)  # CSV digits
  md = open(report_lib.write_report(out)['report_md']).read()
  assert 'With 3 towers' in md


def test_summary_statistics_on_synthetic_items(small_corpus_dir):
  """Function words planted at pref +1, content words at -1 (punctuation near 0): a class
  split in both tests' senses, the prefer test far beyond its shuffled control."""
  config = analysis_config(small_corpus_dir)
  config.analysis.n_perm = 999
  rng = np.random.default_rng(0)
  v = 220
  wc = np.array(['closed'] * 60 + ['open'] * 100 + ['punct'] * 20 + [''] * 20 + ['fragment'] * 20)
  pref = np.where(wc == 'closed', 1.0, np.where(wc == 'punct', 0.0, -1.0)) + 0.1 * rng.normal(
      size=v)
  control = 0.1 * rng.normal(size=(20, v))
  count = rng.integers(1, 500, size=v).astype(float)
  res = {'count': count, 'pref': pref, 'pref_norm': np.clip(pref, -1, 1),
         'control_pref': control[0], 'control_pref_KxV': control, 'best': (pref < 0).astype(int),
         'seconds': 1.0, 'prepare_seconds': 0.0, 'tokens_per_s': 1.0}
  classes = {'word_class': wc, 'upos': np.full(v, ''), 'source': 'function_words'}
  pieces = [f'p{i}' for i in range(v)]
  labels = np.where(wc == 'closed', planted.SYNTAX, np.where(wc == 'open', planted.TOPIC, -1))
  item_loss = 8.0 - np.log(count) + 0.1 * rng.normal(size=v)
  s = summary_lib.estimator_summary(res, pieces, classes, 2, config, item_loss, labels)
  keep = res['count'] >= config.analysis.min_count
  assert s['n_items'] == keep.sum() and s['n_fragments'] == (keep & (wc == 'fragment')).sum()
  ce = s['class_enrichment']
  assert ce['auc'] == 1.0 and ce['auc_unadjusted'] == 1.0 and ce['mean_pref_positive'] > 0.8
  assert ce['p'] <= 2 * 2 / 1000 and ce['test']['direction'] == 'positive->0'
  assert ce['n_positive'] == (keep & (wc == 'closed')).sum()
  assert s['punct']['test']['lean_positive']['p_positive'] > 0.01  # punctuation sits at 0
  assert s['prefer']['null']['p'] == 1 / 21  # beyond every shuffled draw
  assert s['planted']['auc'] == 1.0 and s['planted']['n_positive'] == ce['n_positive']
  assert s['bimodality'] > 0.8 > s['control']['bimodality']
  assert sum(b['n'] for b in s['frequency']['bins']) == s['n_items']
  assert sum(s['histogram']['counts']) == s['n_items']
  top = s['top_items']
  assert all(wc[t['token_id']] == 'closed' for t in top['tower_0'])
  assert all(wc[t['token_id']] != 'closed' for t in top['tower_1'])


@pytest.mark.slow
def test_cli_compare(cli_analysis, tmp_path):
  """--compare DIR1 DIR2 delegates to compare.run_compare (a run against a copy: rho = 1)."""
  workdir, analysed = cli_analysis
  assert analysed.returncode == 0, analysed.stderr[-3000:]
  copy = tmp_path / 'copy'
  shutil.copytree(os.path.join(workdir, 'analysis'), copy / 'analysis')
  r = run_module('twotower_jax.analyze', '--compare', workdir, str(copy),
                 f'--out={tmp_path / "cmp"}', '--config.analysis.min_count=5',
                 '--config.analysis.n_boot=20')
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.load(open(tmp_path / 'cmp' / 'compare.json'))
  assert out['pairs']


@pytest.mark.slow
def test_analysis_over_training_steps(tmp_path, small_corpus_dir):
  """--steps=all analyses every kept checkpoint and tabulates the statistics by step."""
  workdir = str(tmp_path / 'run')
  config = analysis_config(small_corpus_dir, **{'train.steps': 4, 'train.checkpoint_every': 2,
                                                'train.eval_every': 2})
  train_lib.train_and_evaluate(config, workdir)
  flags = ['--config.analysis.estimators=ablation', '--config.analysis.min_count=2',
           '--config.analysis.n_boot=10', '--config.analysis.n_control=5']
  r = run_module('twotower_jax.analyze', f'--workdir={workdir}', '--steps=all', *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  out = os.path.join(workdir, 'analysis')
  assert sorted(os.listdir(os.path.join(out, 'steps'))) == ['2', '4']
  rows = json.load(open(os.path.join(out, 'over_training.json')))['steps']
  assert [row['step'] for row in rows] == [2, 4]
  assert all(row['per_estimator']['ablation']['n_items'] > 0 for row in rows)
  md = open(os.path.join(out, 'over_training.md')).read()
  assert '![over_training](figures/over_training.png)' in md and '| 4 |' in md
  assert os.path.getsize(os.path.join(out, 'figures', 'over_training.png')) > 1000
  bad = run_module('twotower_jax.analyze', f'--workdir={workdir}', '--steps=3', *flags)
  assert bad.returncode == 2 and 'no checkpoint for step(s) [3]; kept: [2, 4]' in bad.stderr


@pytest.mark.parametrize('routing', ['fixed', 'edited'])
def test_ablations_on_a_mixture_hold_its_routing_fixed(tmp_path, small_corpus_dir, routing):
  """Tower heads that ignore their states predict the same whatever the states: with the
  gate's routing fixed ('fixed', the default) replacing a tower's states costs nothing,
  although the prior reads them; 'edited' lets the replacement reroute and move the
  likelihood (the known-answer failure of mean ablation, docs/ANALYSIS.md)."""
  from twotower_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  config = analysis_config(small_corpus_dir, **{'model.gate': 'latent', 'mesh.tower': 1})
  config.analysis.eval_windows = 4
  config.analysis.ablation_routing = routing
  setup = setup_lib.build(config, str(tmp_path))
  params = state_lib.init(setup.model, optimizer_lib.make(config), 0).params
  heads = params['gate']['heads']['dense']
  heads['kernel'] = jnp.zeros_like(heads['kernel'])
  heads['bias'] = jax.random.normal(jax.random.PRNGKey(1), heads['bias'].shape)
  ctx = est_lib.Context(config=config, model=setup.model, params=params,
                        eval_batches=est_lib.base.eval_batches(setup.splits.val_windows, 4,
                                                               config.train.batch_size),
                        train_windows=setup.splits.train_windows,
                        analysis_dir=str(tmp_path / 'analysis'), step=0)
  for name in ('ablation', 'resample'):
    res = est_lib.base.score(ctx, name)
    seen = res['count'] > 0
    moved = np.abs(res['mean_NxV'][:, seen]).max()
    if routing == 'fixed':
      assert moved < 1e-5, (name, moved)
    else:
      assert moved > 1e-3, (name, moved)


def test_eval_documents_scores_only_the_matching_held_out_documents(tmp_path, small_corpus_dir):
  """analysis.eval_documents: the windows of the held-out documents whose name matches,
  packed alone (a domain's held-out loss), or a one-line error naming the regex."""
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  from twotower_jax.data import windows  # pylint: disable=g-import-not-at-top
  setup = setup_lib.build(analysis_config(small_corpus_dir), str(tmp_path))
  names = [os.path.basename(n) for n in setup.corpus.val_names]
  assert names == ['1862-Lincoln-1.txt', '1985-Reagan-1.txt']
  every, docs = analysis.held_out_windows(setup, '')
  assert every is setup.splits.val_windows and len(docs) == 2
  lincoln, docs = analysis.held_out_windows(setup, '1862-')
  assert [os.path.basename(d) for d in docs] == ['1862-Lincoln-1.txt']
  alone = windows.pack_windows(tokenizer.encode_docs(setup.tokenizer, setup.corpus.val_docs[:1]),
                               setup.config.data.seq_len)
  np.testing.assert_array_equal(lincoln, alone)
  assert 0 < len(lincoln) < len(every)
  with pytest.raises(analysis.AnalysisError, match=r"eval_documents='\^18\$' matches none"):
    analysis.held_out_windows(setup, '^18$')
  bad = config_lib.base_config()
  bad.analysis.eval_documents = '(18'
  with pytest.raises(config_lib.ConfigError, match='not a regular expression'):
    config_lib.validate(bad)


def test_gate_scores_the_argmax_deferral(tmp_path, small_corpus_dir):
  """The gate estimator's extras: the tower with the largest prior (here always tower 1, by
  its planted bias) and the loss of taking each token from it, -log p_1(x)."""
  from twotower_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  config = analysis_config(small_corpus_dir, **{'model.gate': 'latent', 'mesh.tower': 1})
  config.analysis.eval_windows = 4
  setup = setup_lib.build(config, str(tmp_path))
  params = state_lib.init(setup.model, optimizer_lib.make(config), 0).params
  prior = params['gate']['gate']
  prior['kernel'] = jnp.zeros_like(prior['kernel'])
  prior['bias'] = jnp.array([0.0, 3.0])
  batches = est_lib.base.eval_batches(setup.splits.val_windows, 4, config.train.batch_size)
  ctx = est_lib.Context(config=config, model=setup.model, params=params, eval_batches=batches,
                        train_windows=setup.splits.train_windows,
                        analysis_dir=str(tmp_path / 'analysis'), step=0)
  res = est_lib.base.score(ctx, 'gate')
  nll_V, count_V = np.zeros(setup.model.cfg.vocab_size), np.zeros(setup.model.cfg.vocab_size)
  for i, window in enumerate(batches):
    ex = est_lib.base.example(setup.model, window, i)
    out = setup.model.apply({'params': params}, ex['inputs'])
    logp = np.asarray(est_lib.base.target_log_probs(out['tower_logits_NxBxLxV'][1],
                                                    ex['targets']))
    w, t = np.asarray(ex['weights']).ravel(), np.asarray(ex['targets']).ravel()
    np.add.at(nll_V, t, -logp.ravel() * w)
    np.add.at(count_V, t, w)
  seen = count_V > 0
  np.testing.assert_allclose(res['extras']['argmax_nll'][seen], nll_V[seen] / count_V[seen],
                             rtol=1e-5)
  np.testing.assert_array_equal(res['extras']['chosen_t1'][seen], 1.0)
  np.testing.assert_array_equal(res['extras']['chosen_t0'][seen], 0.0)
  entry = analysis._estimator_entry('gate', res, [''] * seen.size,
                                    analysis.word_classes(config.analysis, setup.tokenizer)[0],
                                    config, ctx.item_loss, None, None)
  assert entry['extra_means']['chosen_t1'] == 1.0
  assert entry['extra_means']['argmax_nll'] == pytest.approx(nll_V.sum() / count_V.sum(), 1e-5)
  assert sum(entry['position_means']) == pytest.approx(1.0, 1e-5)  # responsibilities sum to 1


def test_an_eras_run_is_scored_on_another_eras_held_out_speeches(tmp_path):
  """data.sotu_years: eval_documents matches among the whole collection's held-out speeches
  (held out from every era's run), so a domain expert is scored out of its domain too."""
  from twotower_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  config = analysis_config(str(tmp_path), **{'data.source': 'sotu', 'data.text_glob': '',
                                    'data.sotu_years': '1790-1899', 'data.vocab_size': 256})
  setup = setup_lib.build(config, str(tmp_path))
  assert all(int(os.path.basename(n)[:4]) <= 1899 for n in setup.corpus.val_names)
  windows_new, docs = analysis.held_out_windows(setup, '^(194[5-9]|19[5-9]|20)')
  every = corpus_lib.load(config_lib_copy(config.data, sotu_years=''))
  assert docs and docs == [n for n in every.val_names if int(n[:4]) >= 1945]
  assert len(windows_new) > 0 and not set(docs) & set(every.train_names)
  _, own = analysis.held_out_windows(setup, '^18')  # its own era: as before
  assert own == [n for n in setup.corpus.val_names if n.startswith('18')]


def config_lib_copy(node, **fields):
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  out = config_lib.from_dict(config_lib.to_dict(node))
  out.update(fields)
  return out
