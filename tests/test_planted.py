"""The planted-structure language: determinism, labels, validation, tokenizer classes, AUC."""

import collections
import itertools
import os

import numpy as np
import pytest

from twotower_jax.analysis import summary as summary_lib
from twotower_jax import workdir as workdir_lib
from twotower_jax.train import setup as setup_lib
from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax import errors
from twotower_jax.data import planted
from twotower_jax.analysis import stats
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.train import loop as train


def small(**overrides):
  """A small planted config (every word frequent enough to appear in training)."""
  c = config_lib.base_config()
  c.data.source = 'planted'
  c.data.tokenizer_type = 'word'
  c.data.planted_docs = 120
  c.data.planted_sentences = 8
  c.data.planted_topics = 4
  c.data.planted_topic_words = 10
  c.data.planted_zipf = 0.0
  c.data.val_fraction = 0.1
  for key, value in overrides.items():
    c.data[key] = value
  c.data.vocab_size = planted.required_vocab_size(c.data)
  return c


def test_same_seed_same_corpus_other_seed_other_corpus():
  _, a = planted.generate(small().data)
  _, b = planted.generate(small().data)
  _, c = planted.generate(small(planted_seed=1).data)
  assert [d.words for d in a] == [d.words for d in b]
  assert [d.text for d in a] == [d.text for d in b]
  assert [d.words for d in a] != [d.words for d in c]


def test_labels_match_how_each_token_was_produced():
  purity, agreement = 0.8, 0.7
  d = small(planted_docs=300, planted_topic_purity=purity, planted_agreement=agreement).data
  lang, docs = planted.generate(d)
  topic_of = {w: k for k, group in enumerate(lang.topic_words) for w in group}
  cls_of = {w: c for groups in (lang.determiners, lang.markers)
            for c, group in enumerate(groups) for w in group}
  n_content = n_content_own = n_marks = n_marks_agree = 0
  for doc in docs:
    assert len(doc.words) == len(doc.classes) == len(doc.slots) == len(doc.noise)
    assert doc.text.split() == doc.words
    assert len(doc.text.splitlines()) == doc.n_sentences
    last_det_cls = None
    for word, cls, slot, noisy in zip(doc.words, doc.classes, doc.slots, doc.noise):
      assert cls == lang.word_class[word]
      if slot in ('N', 'V'):
        assert cls == planted.TOPIC
        n_content += 1
        if not noisy:  # drawn from the document's topic by construction
          assert topic_of[word] == doc.topic
        n_content_own += topic_of[word] == doc.topic
      else:
        assert cls == planted.SYNTAX
        if slot == 'D':
          assert word in lang.determiners[cls_of[word]]
          last_det_cls = cls_of[word]
        elif slot == 'S':
          assert word in lang.markers[cls_of[word]]
          n_marks += 1
          if not noisy:
            assert cls_of[word] == last_det_cls
          n_marks_agree += cls_of[word] == last_det_cls
        elif slot == 'P':
          assert word in lang.prepositions
        else:
          assert word == lang.ends[int(slot[1:])]
  # Stated strengths: noise draws are uniform, so they hit the right group 1/k of the time.
  want_topic = purity + (1 - purity) / d.planted_topics
  want_agree = agreement + (1 - agreement) / d.planted_agreement_classes
  assert abs(n_content_own / n_content - want_topic) < 0.02
  assert abs(n_marks_agree / n_marks - want_agree) < 0.03


def test_word_templates_and_class_map():
  lang = planted.language(small().data)
  n_syntax = 2 * 3 * 4 + 6 + planted.N_ENDS
  assert sum(c == planted.SYNTAX for c in lang.word_class.values()) == n_syntax
  assert sum(c == planted.TOPIC for c in lang.word_class.values()) == 4 * 10
  assert all(w.isalpha() for w in lang.word_class)  # no digits: one SentencePiece piece each
  assert planted.CLASS_NAMES[planted.SYNTAX] == 'syntax'
  assert planted.CLASS_NAMES[planted.TOPIC] == 'topic'


@pytest.mark.parametrize('field,value,match', [
    ('planted_topics', 1, 'planted_topics=1 must be an integer >= 2'),
    ('planted_topic_purity', 1.5, r'planted_topic_purity=1.5 must be a probability'),
    ('planted_agreement', -0.1, r'planted_agreement=-0.1 must be a probability'),
    ('planted_docs', 0, 'planted_docs=0'),
    ('planted_zipf', -1.0, 'planted_zipf=-1.0'),
    ('planted_words_per_class', 0, 'planted_words_per_class=0'),
])
def test_bad_parameters_are_config_errors(field, value, match):
  c = small()
  c.data[field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    setup_lib.check_config(c)


def test_word_tokenizer_size_must_fit_the_language():
  c = small()
  c.data.planted_topics = 5
  with pytest.raises(config_lib.ConfigError,
                     match=f'set data.vocab_size={planted.required_vocab_size(c.data)}'):
    setup_lib.check_config(c)


def test_token_classes_on_a_trained_tokenizer(tmp_path):
  c = small()
  setup_lib.check_config(c)
  lang, _ = planted.generate(c.data)
  corpus = corpus_lib.load(c.data)
  path = str(tmp_path / 'tok.model')
  tokenizer_lib.train(corpus.train_docs, path, c.data.vocab_size, 'word')
  sp = tokenizer_lib.load(path)
  classes_V = planted.token_classes(c, sp)
  assert classes_V.shape == (c.data.vocab_size,) and classes_V.dtype == np.int32
  for word, cls in lang.word_class.items():
    ids = sp.encode(word)
    assert len(ids) == 1, word  # every word is one piece
    assert classes_V[ids[0]] == cls
  assert (classes_V >= 0).sum() == len(lang.word_class)
  for special in tokenizer_lib.SPECIAL_IDS:
    assert classes_V[special] == planted.UNKNOWN
  # A subword tokenizer: whole-word pieces keep their class; a fragment has one when every
  # word it is part of has that class ('▁t' and 'tB' only in topic words); a fragment of both
  # classes' words (a lower-case suffix) and the specials are UNKNOWN.
  path_u = str(tmp_path / 'bpe.model')
  tokenizer_lib.train(corpus.train_docs, path_u, 60, 'bpe')
  sp_u = tokenizer_lib.load(path_u)
  classes_u = planted.token_classes(c, sp_u)
  in_words: dict[int, set] = {}
  for word, cls in lang.word_class.items():
    for i in sp_u.encode(word):
      in_words.setdefault(i, set()).add(cls)
  for i in range(sp_u.get_piece_size()):
    piece = sp_u.id_to_piece(i)
    if piece.startswith('\u2581') and piece[1:] in lang.word_class:
      assert classes_u[i] == lang.word_class[piece[1:]], piece
    elif i in tokenizer_lib.SPECIAL_IDS or len(in_words.get(i, ())) != 1:
      assert classes_u[i] == planted.UNKNOWN, piece
    else:
      assert classes_u[i] == next(iter(in_words[i])), piece
  fragments = [i for i in range(sp_u.get_piece_size())
               if classes_u[i] >= 0 and sp_u.id_to_piece(i)[1:] not in lang.word_class]
  assert fragments and (classes_u == planted.UNKNOWN).sum() > 5


def _auc_pairwise(scores, labels):
  pos = [s for s, l in zip(scores, labels) if l]
  neg = [s for s, l in zip(scores, labels) if not l]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


def test_auc_on_planted_labels_equals_pairwise_count():
  c = small()
  lang, docs = planted.generate(c.data)
  words = lang.words
  counts = collections.Counter(w for doc in docs for w in doc.words)
  labels = np.asarray([lang.word_class[w] == planted.SYNTAX for w in words])
  rng = np.random.default_rng(0)
  # A preference that leans syntax -> positive, with ties (rounded) and overlap.
  scores = np.round(labels * 0.5 + rng.normal(0, 0.6, len(words)), 1)
  scores += 0.01 * np.log([counts[w] for w in words])
  got = stats.auc(scores, labels)
  assert got == pytest.approx(_auc_pairwise(scores, labels), abs=1e-12)
  assert 0.5 < got < 1.0
  assert stats.auc(labels.astype(float), labels) == 1.0


def test_planted_source_builds_train_and_val_like_the_main_job(tmp_path):
  c = small()
  c.data.seq_len = 32
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_mlp = 1, 32, 2, 64
  c.model.max_len = 32
  c.mesh.tower = 1
  setup_lib.check_config(c)
  workdir = str(tmp_path / 'run')
  setup = setup_lib.build(c, workdir)
  assert os.path.exists(os.path.join(workdir, workdir_lib.TOKENIZER))
  assert len(setup.corpus.val_docs) == 12 and len(setup.corpus.train_docs) == 108
  assert not set(setup.corpus.val_names) & set(setup.corpus.train_names)
  assert setup.splits.train_windows.shape[1] == 33 and len(setup.splits.val_windows) > 0
  classes_V = planted.token_classes(c, setup.tokenizer)
  ids = setup.splits.train_windows.ravel()
  ids = ids[(ids != tokenizer_lib.PAD_ID) & (ids != tokenizer_lib.EOS_ID)]
  assert (classes_V[ids] >= 0).all()  # every word token has a class
  assert tokenizer_lib.UNK_ID not in set(setup.splits.val_windows.ravel().tolist())


def test_planted_class_test_selects_items_and_orients_auc(small_corpus_dir):
  """summary's planted block: classified items with count >= min_count; syntax positive, so
  syntax leaning to tower 0 gives an AUC above 0.5, and flipping the towers flips it."""
  from conftest import file_config  # pylint: disable=g-import-not-at-top
  config = file_config('planted')
  config.analysis.min_count, config.analysis.n_perm, config.analysis.n_boot = 2, 199, 50
  classes_V = np.asarray([-1, -1, 0, 0, 0, 1, 1, 1, 1, 0], np.int32)
  pref_V = np.asarray([9.0, -9.0, 2.0, 1.0, np.nan, -1.0, 0.5, -2.0, 3.0, -5.0])
  counts_V = np.asarray([100, 100, 50, 50, 50, 50, 50, 50, 50, 1], float)

  def planted_block(pref):
    res = {'count': counts_V, 'pref': pref, 'pref_norm': np.clip(pref, -1, 1),
           'control_pref_KxV': np.zeros((3, 10)), 'best': (pref < 0).astype(int),
           'seconds': 0.0, 'prepare_seconds': 0.0, 'tokens_per_s': 0.0}
    classes = {'word_class': np.full(10, ''), 'upos': np.full(10, ''), 'source': 'word_list'}
    return summary_lib.estimator_summary(res, [str(i) for i in range(10)], classes, 2, config,
                                         np.ones(10), classes_V)['planted']
  out = planted_block(pref_V)
  # Kept: syntax {2.0, 1.0}, topic {-1.0, 0.5, -2.0, 3.0}: 6 of 8 pairs won.
  assert out['n_positive'] == 2 and out['n_negative'] == 4
  assert out['auc_unadjusted'] == pytest.approx(_auc_pairwise([2.0, 1.0, -1.0, 0.5, -2.0, 3.0],
                                                              [1, 1, 0, 0, 0, 0]))
  assert out['auc_unadjusted'] == pytest.approx(6 / 8)
  flipped = planted_block(-pref_V)
  assert flipped['auc_unadjusted'] == pytest.approx(1 - out['auc_unadjusted'])
  assert flipped['auc'] == pytest.approx(1 - out['auc'])


def test_oracle_is_the_generators_own_distribution():
  d = small(planted_zipf=1.0, planted_topic_purity=0.8, planted_agreement=0.9).data
  lang, docs = planted.generate(d)
  oracle = planted.Oracle(d)
  doc = docs[0]
  lp, dists = oracle.log_probs(doc.words, return_dists=True)
  for dist in dists:  # a distribution over the whole vocabulary at every position
    assert dist.sum() == pytest.approx(1.0, abs=1e-12) and (dist >= 0).all()
  # Sentence start: templates begin with D (2 of 4), V (1) or P (1).
  first = dict(zip(oracle.words, dists[0]))
  assert sum(first[w] for g in lang.determiners for w in g) == pytest.approx(0.5)
  assert sum(first[w] for w in lang.prepositions) == pytest.approx(0.25)
  assert sum(first[w] for g in lang.topic_words for w in g) == pytest.approx(0.25)
  # The end word is fixed once the prefix has decided the template.
  ends = [i for i, s in enumerate(doc.slots) if s.startswith('E')]
  assert np.allclose(lp[ends], 0.0)
  # A marker after determiner class c: agreement + (1 - agreement) / classes of its mass.
  i = doc.slots.index('S')
  det = next(doc.words[j] for j in range(i - 1, -1, -1) if doc.slots[j] == 'D')
  c = next(k for k, g in enumerate(lang.determiners) if det in g)
  dist = dict(zip(oracle.words, dists[i]))
  assert sum(dist[w] for w in lang.markers[c]) == pytest.approx(0.9 + 0.1 / 3)
  # Knowing the topic helps exactly on topic words.
  blind = planted.Oracle(small(planted_zipf=1.0, planted_topic_purity=0.0,
                               planted_agreement=0.9).data)
  lp_all = np.concatenate([oracle.log_probs(x.words) for x in docs[:20]])
  lp_blind = np.concatenate([blind.log_probs(x.words) for x in docs[:20]])
  cls = np.concatenate([x.classes for x in docs[:20]])
  assert np.allclose(lp_all[cls == planted.SYNTAX], lp_blind[cls == planted.SYNTAX])
  assert lp_all[cls == planted.TOPIC].mean() > lp_blind[cls == planted.TOPIC].mean() + 0.3


def test_reference_losses_order_the_floors():
  ref = planted.reference_losses(small(planted_zipf=1.0).data)
  assert ref['oracle']['loss'] < ref['agreement_blind']['loss']
  assert ref['oracle']['loss'] < ref['topic_blind']['loss']
  assert ref['oracle']['syntax'] == pytest.approx(ref['topic_blind']['syntax'])
  assert ref['oracle']['topic'] == pytest.approx(ref['agreement_blind']['topic'])
  assert ref['agreement_blind']['syntax'] > ref['oracle']['syntax']


def test_per_class_loss_by_hand():
  from twotower_jax import planted_check
  classes_V = np.asarray([-1, -1, -1, -1, -1, 0, 1, 0], np.int32)
  targets = np.asarray([5, 6, 7, 0, 3, 6])
  nll = np.asarray([1.0, 2.0, 3.0, 9.0, 0.5, 4.0])
  out = planted_check.per_class_loss(nll, targets, classes_V)
  assert out['all'] == pytest.approx((1 + 2 + 3 + 0.5 + 4) / 5) and out['n'] == 5
  assert out['syntax'] == pytest.approx(2.0) and out['n_syntax'] == 2
  assert out['topic'] == pytest.approx(3.0) and out['n_topic'] == 2


@pytest.mark.slow  # trains a tiny run: ~40 s of CPU
def test_planted_check_on_a_trained_run(tmp_path):
  from twotower_jax import planted_check
  c = small(planted_zipf=1.0)
  c.data.seq_len = 32
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_mlp = 1, 32, 2, 64
  c.model.max_len = 32
  c.train.steps, c.train.batch_size, c.train.eval_every, c.train.checkpoint_every = 3, 8, 3, 3
  c.mesh.tower = 1
  setup_lib.check_config(c)
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(c, workdir)
  out = planted_check.class_losses(workdir)
  assert out['step'] == 3
  # The eval slice (8 batches of 8) covers every held-out window here: same loss, same targets.
  assert out['model']['n'] == result['eval']['tokens']
  assert out['model']['all'] == pytest.approx(result['eval']['loss'], rel=1e-4)
  m = out['model']
  assert m['n_syntax'] + m['n_topic'] + 12 == m['n']  # every target but the 12 EOS has a class
  assert out['floors']['oracle']['loss'] < out['floors']['topic_blind']['loss']
  with pytest.raises(errors.UserError, match='planted_check needs'):
    c2 = config_lib.base_config()
    workdir_lib.write_config(c2, str(tmp_path))
    planted_check.class_losses(str(tmp_path))
