"""An independent constructed language given as plain text files (data.source=text, word
tokenizer) with its own function/content word list: when the towers really split along those
classes, every estimator separates the classes from the text files alone, and the gate estimator's class
test finds the split the gate was built with."""

import os

import numpy as np
import pytest

import _family

from twotower_jax import config as config_lib
from twotower_jax import errors
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.model import gates
from twotower_jax.train import loop

# 12 function words drawn Zipf-like, so the rarer ones are as frequent as content words and
# the class test's frequency strata hold both classes
FUNCTION = ('ka', 'mo', 'ti', 'ru', 'sel', 'po', 'ne', 'lu', 'wa', 'sho', 'zi', 'tem')
FUNCTION_P = (1 / np.arange(1, len(FUNCTION) + 1)) / np.sum(1 / np.arange(1, len(FUNCTION) + 1))
CONTENT = tuple(f'{c}{v}{e}' for c in 'bdfg' for v in 'aeiou' for e in ('n', 'rl'))  # 40
SPLIT_IDS = []  # function-word piece ids, filled by the fixture once the tokenizer exists


def write_corpus(root, n_docs=60, seed=0):
  """Documents of sentences 'F C C F C .'-like: a function word opens each phrase, content
  words come from the document's topic (a quarter of the content words)."""
  rng = np.random.default_rng(seed)
  os.makedirs(root)
  for d in range(n_docs):
    topic = CONTENT[(d % 4) * 10:(d % 4) * 10 + 10]
    sentences = []
    for _ in range(12):
      words = []
      for _ in range(rng.integers(2, 4)):
        words.append(FUNCTION[rng.choice(len(FUNCTION), p=FUNCTION_P)])
        words += list(rng.choice(topic, size=rng.integers(1, 3)))
      sentences.append(' '.join(words))
    with open(os.path.join(root, f'doc{d:03d}.txt'), 'w') as f:
      f.write('\n'.join(sentences) + '\n')
  classes = os.path.join(os.path.dirname(root), 'classes.tsv')
  with open(classes, 'w') as f:
    f.write('# constructed language: word<TAB>class\n')
    f.writelines(f'{w}\tclosed\n' for w in FUNCTION)
    f.writelines(f'{w}\topen\n' for w in CONTENT)
  return classes


@pytest.fixture
def split_gate():
  gates.register('class_split_test', mixture=True)(_family.split_gate(SPLIT_IDS))
  yield
  gates.GATES.pop('class_split_test')
  SPLIT_IDS.clear()


@pytest.mark.slow
def test_constructed_language_split_is_recovered(tmp_path, split_gate):
  del split_gate
  classes = write_corpus(str(tmp_path / 'corpus'))
  c = config_lib.base_config()
  c.data.source, c.data.text_glob = 'text', str(tmp_path / 'corpus' / '*.txt')
  c.data.tokenizer_type, c.data.val_fraction = 'word', 0.2
  c.data.vocab_size = len(tokenizer_lib.SPECIAL_IDS) + 1 + len(FUNCTION) + len(CONTENT)
  c.data.seq_len = c.model.max_len = 32
  c.model.gate = 'class_split_test'
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_mlp = 1, 32, 2, 64
  c.model.dropout = 0.0
  c.train.steps, c.train.batch_size, c.optimizer.lr, c.optimizer.warmup_steps = 60, 8, 5e-3, 5
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 20, 60, 60
  c.mesh.tower = 2
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  docs = [open(p).read() for p in sorted((tmp_path / 'corpus').glob('*.txt'))]
  tokenizer_lib.train(docs, workdir_lib.path(workdir, workdir_lib.TOKENIZER), c.data.vocab_size,
                      'word')  # first, so the gate knows the function words' ids
  sp = tokenizer_lib.load(workdir_lib.path(workdir, workdir_lib.TOKENIZER))
  SPLIT_IDS.extend(sp.piece_to_id('\u2581' + w) for w in FUNCTION)
  assert sp.unk_id() not in SPLIT_IDS
  loop.train_and_evaluate(c, workdir)

  from twotower_jax.analysis import runner  # pylint: disable=g-import-not-at-top
  a = config_lib.base_config().analysis
  a.word_classes, a.min_count, a.n_boot, a.n_control = classes, 5, 100, 20
  a.estimators = 'probe,ablation,resample,gate'
  a.probe_windows, a.probe_steps = 64, 300
  summary = runner.run(runner.load_config(workdir, a), workdir)
  assert set(summary['estimators']) == {'probe', 'ablation', 'resample', 'gate'}
  for est, ps in summary['per_estimator'].items():
    ce = ps['class_enrichment']
    assert ce['source'] == 'word_list' and ce['n_positive'] == len(FUNCTION), est
    assert ce['auc_unadjusted'] >= 0.95, (est, ce)  # every estimator separates the classes
    assert ce['test']['direction'] == 'positive->0', (est, ce['test'])
    assert ce['test']['lean_negative']['p_negative'] < 1e-6, est  # content words: tower 1
  # The gate routes function words to tower 0 by construction: the gate estimator's class test
  # rejects. Ablation and resample put function words near 0 under this hard gate (removing
  # tower 1 costs them nothing), so only content words lean and the class test does not reject.
  gate = summary['per_estimator']['gate']['class_enrichment']
  assert gate['p'] < 0.01 and gate['test']['lean_positive']['share_positive'] == 1.0, gate
  report = open(os.path.join(workdir, 'analysis', 'report.md')).read()
  assert 'the word-class list analysis.word\\_classes' in report
  assert 'class split: function words lean to tower 0, content words to tower 1' in report, report
  bad = tmp_path / 'bad.tsv'
  bad.write_text('ka\tfunction\n')
  a.word_classes, a.estimators = str(bad), 'ablation'
  with pytest.raises(errors.UserError, match=f'{bad}:1: expected word<TAB>closed\\|open'):
    runner.run(runner.load_config(workdir, a), workdir)
