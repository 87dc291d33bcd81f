"""Structural probe: tree distances, MST/UUAS against brute force, a planted tree geometry."""

import itertools
import os

import numpy as np
import pytest

from twotower_jax import workdir as workdir_lib
from twotower_jax.train import setup as setup_lib
from twotower_jax.analysis import structural_probe as sprobe
from twotower_jax.analysis import wordclass


def random_tree(rng, n):
  """heads (1-based, 0 = root) of a random tree over n words in random order."""
  order = rng.permutation(n)
  heads = np.zeros(n, np.int32)
  for k in range(1, n):
    heads[order[k]] = order[rng.integers(0, k)] + 1
  return heads


def test_tree_distances_hand_computed():
  # "the cat sat on the mat": the->cat, cat->sat (root), on->mat, the->mat, mat->sat
  heads = [2, 3, 0, 6, 6, 3]
  d = sprobe.tree_distances(heads)
  expected = np.array([
      [0, 1, 2, 4, 4, 3],
      [1, 0, 1, 3, 3, 2],
      [2, 1, 0, 2, 2, 1],
      [4, 3, 2, 0, 2, 1],
      [4, 3, 2, 2, 0, 1],
      [3, 2, 1, 1, 1, 0]])
  np.testing.assert_array_equal(d, expected)


def brute_force_mst(d):
  """Minimum spanning tree by trying every tree (Pruefer sequences), n <= 6."""
  n = d.shape[0]
  best, best_edges = np.inf, None
  for seq in itertools.product(range(n), repeat=n - 2):
    degree = [1] * n
    for s in seq:
      degree[s] += 1
    edges = set()
    seq = list(seq)
    for s in seq:
      leaf = min(i for i in range(n) if degree[i] == 1)
      edges.add((min(leaf, s), max(leaf, s)))
      degree[leaf] -= 1
      degree[s] -= 1
    u, v = [i for i in range(n) if degree[i] == 1]
    edges.add((u, v))
    w = sum(d[i, j] for i, j in edges)
    if w < best:
      best, best_edges = w, edges
  return best_edges


@pytest.mark.parametrize('seed', range(12))
def test_mst_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = 2 + seed % 5
  a = rng.random((n, n))
  d = a + a.T  # distinct weights: the MST is unique
  assert sprobe.mst_edges(d) == brute_force_mst(d)


def prim_mst(d):
  """The hand-written Prim's algorithm mst_edges used before scipy's (the reference)."""
  n = d.shape[0]
  in_tree, best, parent, edges = np.zeros(n, bool), d[0].copy(), np.zeros(n, np.int64), set()
  in_tree[0] = True
  for _ in range(n - 1):
    j = int(np.argmin(np.where(in_tree, np.inf, best)))
    edges.add((min(int(parent[j]), j), max(int(parent[j]), j)))
    in_tree[j] = True
    closer = (d[j] < best) & ~in_tree
    best[closer], parent[closer] = d[j][closer], j
  return edges


def _weight(d, edges):
  return sum(d[i, j] for i, j in edges)


def test_scipy_mst_matches_the_old_prim_on_zero_tiny_and_tied_weights():
  """scipy's MST, as mst_edges calls it, gives the old Prim's tree: on distinct weights the
  same edges; with ties a tree of the same weight. Zero distances (two words with the same
  state) and ones below 1e-8 are edges too (scipy alone drops them and returns a forest)."""
  rng = np.random.default_rng(0)
  heads = random_tree(rng, 12)
  states = tree_geometry_states(heads, 12) @ rng.normal(size=(12, 6))
  states[3] = states[7]  # two words with the same state: distance 0
  planted = ((states[:, None] - states[None]) ** 2).sum(-1)
  a = rng.random((9, 9))
  distinct = {'planted': planted, 'random': a + a.T, 'tiny': (a + a.T) * 1e-9}
  tied = {'integer': sprobe.tree_distances(heads).astype(float),
          'zeros': np.zeros((5, 5)), 'ties': rng.integers(0, 3, (8, 8)) + 0.0}
  tied['ties'] = np.minimum(tied['ties'], tied['ties'].T)
  for name, d in {**distinct, **tied}.items():
    new, old = sprobe.mst_edges(d), prim_mst(d)
    assert len(new) == d.shape[0] - 1, name  # a spanning tree, not a forest
    assert _weight(d, new) == pytest.approx(_weight(d, old), abs=1e-12), name
    if name in distinct:
      assert new == old, name
  assert sprobe.mst_edges(np.zeros((1, 1))) == set()


def brute_force_uuas(pred, heads, upos):
  keep = [i for i in range(len(heads)) if upos[i] != 'PUNCT']
  gold = {(min(i, h - 1), max(i, h - 1)) for i, h in enumerate(heads)
          if h > 0 and i in keep and h - 1 in keep}
  sub = pred[np.ix_(keep, keep)]
  tree = {(min(keep[i], keep[j]), max(keep[i], keep[j])) for i, j in brute_force_mst(sub)}
  return len(tree & gold), len(gold)


@pytest.mark.parametrize('seed', range(8))
def test_uuas_excludes_punctuation_like_brute_force(seed):
  rng = np.random.default_rng(100 + seed)
  n = 7
  heads = random_tree(rng, n)
  upos = np.array(['NOUN'] * n, dtype=object)
  upos[rng.choice(n, size=1 + seed % 2, replace=False)] = 'PUNCT'
  a = rng.random((n, n))
  pred = a + a.T
  assert sprobe.uuas_counts(pred, heads, upos) == brute_force_uuas(pred, heads, upos)
  # Exact gold distances recover every gold edge between kept words.
  gold = sprobe.tree_distances(heads)
  c, t = sprobe.uuas_counts(gold.astype(float), heads, upos)
  assert t == 0 or c / t > 0.5  # punctuation removal may disconnect the gold tree


def test_perfect_distances_give_uuas_one_and_dspr_one():
  rng = np.random.default_rng(0)
  for _ in range(5):
    heads = random_tree(rng, 9)
    upos = np.array(['NOUN'] * 9, dtype=object)
    d = sprobe.tree_distances(heads).astype(float)
    c, t = sprobe.uuas_counts(d + 1e-3 * rng.random((9, 9)), heads, upos)
    assert c == t == 8
    assert sprobe.sentence_spearman(d, d, upos) == pytest.approx(1.0)
  assert sprobe.dspr([1.0, 0.5, 0.0], [5, 5, 60]) == pytest.approx(0.75)  # length 60 ignored


def test_sentence_spearman_is_the_mean_of_scipy_spearmans_over_words():
  """The vectorised per-word Spearman equals scipy's, row by row (ties, a constant row)."""
  from scipy import stats as sp_stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  upos = np.array(['NOUN', 'PUNCT', 'VERB', 'NOUN', 'DET', 'ADJ', 'NOUN'], dtype=object)
  words = np.nonzero(upos != 'PUNCT')[0]
  pred = rng.integers(0, 4, (7, 7)).astype(float)  # ties
  gold = rng.random((7, 7))
  pred[words[1], :] = 2.0  # constant row: scipy gives nan, skipped by the mean
  expected = []
  for i in words:
    others = words[words != i]
    a, b = pred[i, others], gold[i, others]
    expected.append(np.nan if np.all(a == a[0]) else sp_stats.spearmanr(a, b).statistic)
  assert np.isnan(expected[1]) and np.isfinite(expected).sum() == len(words) - 1
  assert sprobe.sentence_spearman(pred, gold, upos) == pytest.approx(np.nanmean(expected))


def tree_geometry_states(heads, width):
  """Word i -> indicator of its ancestors-or-self: ||v_i - v_j||^2 = tree distance exactly."""
  n = len(heads)
  v = np.zeros((n, width), np.float32)
  for i in range(n):
    j = i
    while True:
      v[i, j] = 1.0
      if heads[j] == 0:
        break
      j = heads[j] - 1
  return v


def test_probe_learns_planted_tree_geometry():
  """States = random rotation of [tree embedding; noise]: a linear probe recovers the trees."""
  rng = np.random.default_rng(0)
  width, noise_dims = 12, 12
  sents, states = [], []
  for _ in range(160):
    n = int(rng.integers(5, width + 1))
    heads = random_tree(rng, n)
    upos = np.array(['NOUN'] * n, dtype=object)
    sents.append(wordclass.Sentence(np.array(['w'] * n, dtype=object), upos, heads, upos,
                                    np.ones(n, bool), np.zeros(n, np.int32)))
    states.append(tree_geometry_states(heads, width))
  v = np.concatenate(states)  # T x width
  q, _ = np.linalg.qr(rng.normal(size=(width + noise_dims, width + noise_dims)))
  structured = np.concatenate([v, 2.0 * rng.normal(size=(v.shape[0], noise_dims))], 1) @ q
  shuffled = structured[rng.permutation(v.shape[0])]  # control: words lose their trees
  x = np.stack([structured, shuffled]).astype(np.float32)  # P=2 probes
  idx, d, lens = sprobe.pad_sentences([len(s.forms) for s in sents],
                                      [sprobe.tree_distances(s.heads) for s in sents])
  n_train = 120
  b, losses = sprobe.train_probes(x, idx[:n_train], d[:n_train], lens[:n_train], rank=16,
                                  steps=400, lr=1e-2, batch_size=32, seed=0)
  assert losses[-1] < losses[0]
  res = sprobe.evaluate_probes(b, x, idx[n_train:], d[n_train:], sents[n_train:])
  assert res['uuas'][0] > 0.95 and res['dspr'][0] > 0.9, res
  assert res['uuas'][1] < 0.6 and res['dspr'][1] < 0.5, res  # shuffled states: far below the planted geometry


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EWT = next((p for p in (os.path.join(_REPO, d, 'shared', 'data', 'ud_english_ewt')
                        for d in ('.', '..', os.path.join('..', '..')))
            if os.path.isdir(p)), '')
needs_ewt = pytest.mark.skipif(not EWT, reason='shared UD EWT treebank absent')


def probe_config(tiny, **overrides):
  c = tiny(**overrides)
  c.analysis.struct_conllu = EWT
  c.analysis.struct_steps = 20
  c.analysis.struct_max_sentences = 100
  c.analysis.struct_batch_size = 16
  c.analysis.struct_rank = 8
  return c


@needs_ewt
def test_layer_states_and_run_on_tiny_model(tiny, tmp_path):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  config = probe_config(tiny)
  setup = setup_lib.build(config, str(tmp_path))
  params = nn.unbox(setup.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))['params'])
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 32), 5, 256)
  layers = sprobe.layer_states(setup.model, params, tokens)
  assert sprobe.layer_order(layers) == ['input', 'block_1', 'block_2', 'final']
  assert all(v.shape == (2, 3, 32, 32) for v in layers.values())
  plain = setup.model.apply({'params': params}, tokens, deterministic=True)
  np.testing.assert_array_equal(layers['final'], plain['tower_states_NxBxLxH'])
  assert not np.allclose(layers['block_1'], layers['block_2'])

  result = sprobe.run(setup, params, config, str(tmp_path / 'analysis'))
  assert result['layers'] == ['input', 'block_1', 'block_2', 'final']
  assert np.asarray(result['uuas']).shape == (2, 4) == np.asarray(result['dspr']).shape
  assert np.all((np.asarray(result['uuas']) >= 0) & (np.asarray(result['uuas']) <= 1))
  assert result['n_test_sentences'] == 20 and result['n_train_sentences'] == 80
  assert 0 < result['baseline_uuas_adjacent'] < 1
  assert os.path.exists(tmp_path / 'analysis' / workdir_lib.STRUCT_JSON)

  config.analysis.struct_conllu = ''
  with pytest.raises(sprobe.ProbeError, match='struct_conllu'):
    sprobe.run(setup, params, config, str(tmp_path / 'analysis'))


@needs_ewt
def test_cropped_batches_give_the_full_width_states_of_causal_towers(tiny, tmp_path):
  """Causal towers do not see the padding after a sentence, so word_states may run each
  batch only as wide as its longest sentence; the states must not change."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  config = probe_config(tiny, **{'data.seq_len': 128, 'model.max_len': 128})
  setup = setup_lib.build(config, str(tmp_path))
  params = nn.unbox(setup.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 128), jnp.int32))['params'])
  _, toks, mats = sprobe.prepare_sentences(setup.tokenizer, wordclass.read_treebank(EWT)[:60],
                                           128, 'mean')
  lengths = sorted(m.shape[1] for m in mats)
  assert lengths[15] + 1 <= 96 < lengths[-1] + 1  # the shortest batch runs narrower than 128
  full, names = sprobe.word_states(setup.model, params, toks, mats, 16)
  cropped, _ = sprobe.word_states(setup.model, params, toks, mats, 16, crop=True)
  assert full.shape == cropped.shape and len(names) == 4
  np.testing.assert_allclose(cropped, full, atol=2e-5)


@needs_ewt
def test_bilstm_layers_are_elmo_states_and_probe_runs(tiny, tmp_path):
  """bilstm: block_i = [fwd_i; bwd_i] (2H wide); the probe runs on layers of mixed width."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  config = probe_config(tiny)
  config.model.tower_type = 'bilstm'
  setup = setup_lib.build(config, str(tmp_path))
  params = nn.unbox(setup.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))['params'])
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 32), 5, 256)
  layers = sprobe.layer_states(setup.model, params, tokens)
  assert sprobe.layer_order(layers) == ['input', 'block_1', 'block_2', 'final']
  assert layers['block_1'].shape == (2, 3, 32, 64) and layers['final'].shape == (2, 3, 32, 32)
  _, inter = setup.model.apply({'params': params}, tokens, deterministic=True,
                               mutable=['intermediates'])
  towers = inter['intermediates']['towers']
  np.testing.assert_array_equal(layers['block_2'],  # the top layer: the streams the gate joins
                                np.concatenate([towers['fwd'][0], towers['bwd'][0]], -1))
  assert not np.allclose(layers['block_1'], layers['block_2'])

  config.analysis.struct_steps = 20
  result = sprobe.run(setup, params, config, str(tmp_path / 'analysis'))
  assert result['layers'] == ['input', 'block_1', 'block_2', 'final']
  uuas = np.asarray(result['uuas'])
  assert uuas.shape == (2, 4) and np.all((uuas >= 0) & (uuas <= 1))


@needs_ewt
@pytest.mark.slow
def test_run_on_trained_checkpoint(tiny, tmp_path):
  """End to end: train a tiny model, restore its checkpoint, probe it."""
  from twotower_jax.train import checkpoints
  from twotower_jax.train import optimizer as optimizer_lib
  from twotower_jax.train import sharding as sharding_lib
  from twotower_jax.train import loop as train_lib
  from twotower_jax.train import state as state_lib

  config = probe_config(tiny)
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(config, workdir)
  setup = setup_lib.build(config, workdir, train_tokenizer=False)
  tx = optimizer_lib.make(config)
  state_sh = state_lib.shardings(setup.model, tx, setup.mesh, sharding_lib.rules(config))
  mngr = checkpoints.manager(workdir, read_only=True)
  state, _ = checkpoints.restore(mngr, mngr.latest_step(),
                                 state_lib.abstract(setup.model, tx, state_sh))
  result = sprobe.run(setup, state.params, config, os.path.join(workdir, 'analysis'))
  assert np.all(np.isfinite(result['uuas'])) and np.all(np.isfinite(result['test_loss']))


@pytest.mark.parametrize('field,value', [('struct_word_repr', 'last'), ('struct_test_fraction', 1.0),
                                         ('struct_rank', 0), ('struct_lr', 0.0)])
def test_bad_probe_config_is_a_config_error(field, value):
  from twotower_jax import config as config_lib
  c = config_lib.base_config()
  c.analysis[field] = value
  with pytest.raises(config_lib.ConfigError, match=f'analysis.{field}'):
    setup_lib.check_config(c)
