"""CoNLL-U reader, piece -> word alignment and word classes of pieces."""

import collections
import os

import numpy as np
import pytest

from twotower_jax import errors
from twotower_jax.data import tokenizer as tokenizer_lib
from twotower_jax.analysis import wordclass

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared data sit beside the checkout (../shared) or, in a worktree, two levels up.
EWT = next((p for p in (os.path.join(_REPO, d, 'shared', 'data', 'ud_english_ewt')
                        for d in ('.', '..', os.path.join('..', '..')))
            if os.path.isdir(p)), '')
needs_ewt = pytest.mark.skipif(not EWT, reason='shared UD EWT treebank absent')

SAMPLE = '''# sent_id = 1
# text = I don't know, they said.
1	I	I	PRON	PRP	_	3	nsubj	_	_
2-3	don't	_	_	_	_	_	_	_	_
2	do	do	AUX	VBP	_	4	aux	_	_
3	n't	not	PART	RB	_	4	advmod	_	_
4	know	know	VERB	VB	_	0	root	_	SpaceAfter=No
4.1	knows	know	VERB	VB	_	_	_	4:conj	_
5	,	,	PUNCT	,	_	4	punct	_	_
6	they	they	PRON	PRP	_	7	nsubj	_	_
7	said	say	VERB	VBD	_	4	parataxis	_	SpaceAfter=No
8	.	.	PUNCT	.	_	4	punct	_	_

# sent_id = 2
1	Hello	hello	INTJ	UH	_	0	root	_	_
'''


@pytest.fixture(scope='module')
def sp(small_corpus_dir, tmp_path_factory):
  docs = [open(os.path.join(small_corpus_dir, f)).read() for f in sorted(os.listdir(small_corpus_dir))]
  path = str(tmp_path_factory.mktemp('sp') / 'sp.model')
  tokenizer_lib.train(docs, path, 800)
  return tokenizer_lib.load(path)


def test_reader_skips_multiword_ranges_and_empty_nodes(tmp_path):
  path = tmp_path / 'a.conllu'
  path.write_text(SAMPLE)
  s1, s2 = wordclass.read_conllu(str(path))
  # Fixed: 'I', 'do', "n't" ... the range line 2-3 and the empty node 4.1 are not words.
  assert list(s1.forms) == ['I', 'do', "n't", 'know', ',', 'they', 'said', '.']
  assert list(s1.upos) == ['PRON', 'AUX', 'PART', 'VERB', 'PUNCT', 'PRON', 'VERB', 'PUNCT']
  assert s1.heads.tolist() == [3, 4, 4, 0, 4, 7, 4, 4]
  assert s1.heads.dtype == np.int32
  assert s1.lines.tolist() == [3, 5, 6, 7, 9, 10, 11, 12]
  assert wordclass.sentence_text(s1)[0] == "I don't know, they said."
  assert list(s2.forms) == ['Hello'] and s2.heads.tolist() == [0]


@pytest.mark.parametrize('bad_line,lineno,what', [
    ('5\t,\t,\tPUNCT\t,\t_\t4\tpunct\t_', 9, '9 columns'),
    ('5\t,\t,\tPUNCT\t,\t_\tfour\tpunct\t_\t_', 9, "HEAD 'four'"),
    ('5\t,\t,\tPUNCT\t,\t_\t12\tpunct\t_\t_', 9, 'HEAD 12'),
    ('6\t,\t,\tPUNCT\t,\t_\t4\tpunct\t_\t_', 9, 'out of sequence'),
    ('x\t,\t,\tPUNCT\t,\t_\t4\tpunct\t_\t_', 9, "ID 'x'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, lineno, what):
  lines = SAMPLE.splitlines()
  assert lines[lineno - 1].startswith('5\t,')
  lines[lineno - 1] = bad_line
  path = tmp_path / 'bad.conllu'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(errors.UserError) as e:
    wordclass.read_conllu(str(path))
  assert f'{path}:{lineno}:' in str(e.value) and what in str(e.value)


def test_missing_treebank_is_a_user_error(tmp_path):
  with pytest.raises(wordclass.ConllError, match='no CoNLL-U files'):
    wordclass.read_treebank(str(tmp_path / 'nope*.conllu'))


@needs_ewt
def test_reads_shared_treebank_with_plausible_counts():
  sentences = wordclass.read_treebank(EWT)
  n_words = sum(len(s.forms) for s in sentences)
  assert 3000 < len(sentences) < 6000  # EWT dev + test: about 2000 sentences each
  assert 40_000 < n_words < 60_000
  upos = collections.Counter(u for s in sentences for u in s.upos)
  assert upos.most_common(1)[0][0] in ('NOUN', 'PUNCT')
  assert set(upos) <= set(wordclass.CLOSED_UPOS + wordclass.OPEN_UPOS +
                          ('PUNCT', 'NUM', 'INTJ', 'SYM', 'X'))
  for s in sentences[:200]:  # one root, heads inside the sentence
    assert (s.heads == 0).sum() >= 1 and s.heads.max() <= len(s.forms)
  dev = wordclass.read_treebank(os.path.join(EWT, '*-dev.conllu'))  # a glob: one file
  assert 1500 < len(dev) < len(sentences)
  assert [list(s.forms) for s in dev[:5]] == [list(s.forms) for s in sentences[:5]]


def test_tokenize_sentence_aligns_pieces_to_words(sp, tmp_path):
  path = tmp_path / 'a.conllu'
  path.write_text(SAMPLE)
  s1 = wordclass.read_conllu(str(path))[0]
  ids, owner = wordclass.tokenize_sentence(sp, s1)
  text, _ = wordclass.sentence_text(s1)
  assert sp.decode(ids.tolist()) == text
  for w, form in enumerate(s1.forms):  # each word's pieces spell the word
    pieces = ''.join(sp.id_to_piece(int(i)) for i in ids[owner == w]).replace('\u2581', '')
    assert pieces == form
  assert set(owner.tolist()) <= set(range(len(s1.forms))) | {-1}


@pytest.mark.parametrize('source', ['treebank', 'wordlist'])
def test_piece_classes_closed_and_open(sp, source):
  if source == 'treebank' and not EWT:
    pytest.skip('shared UD EWT treebank absent')
  pc = wordclass.piece_classes(sp, EWT if source == 'treebank' else None)
  vocab = sp.get_piece_size()
  assert pc['upos'].shape == pc['word_class'].shape == (vocab,)
  cls = lambda piece: pc['word_class'][sp.piece_to_id(piece)]
  assert cls('\u2581the') == 'closed' and cls('\u2581of') == 'closed'
  assert cls(',') == 'punct' and cls('.') == 'punct'  # tested apart from function words
  nouns = [p for p in ('\u2581government', '\u2581people', '\u2581country', '\u2581year')
           if sp.piece_to_id(p) != sp.unk_id()]
  assert nouns, 'no common noun in the test vocabulary'
  assert all(cls(p) == 'open' for p in nouns)
  for special in (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID, tokenizer_lib.MASK_ID):
    assert pc['word_class'][special] == '' and pc['upos'][special] == ''
  if source == 'treebank':
    assert pc['upos'][sp.piece_to_id('\u2581the')] == 'DET'
    assert pc['upos'][sp.piece_to_id(',')] == 'PUNCT'
    assert all(pc['upos'][sp.piece_to_id(p)] == 'NOUN' for p in nouns)
    assert (pc['upos_count'] > 0).sum() > vocab // 3
  # word-internal pieces have no class of their own ('s' of 'years', 'ing' of 'making'),
  # whichever source decides
  internal = [p for p in ('s', 'ing', 'ed') if sp.piece_to_id(p) != sp.unk_id()]
  assert internal, 'no word-internal piece in the test vocabulary'
  assert all(cls(p) == 'fragment' for p in internal)
  assert set(pc['word_class']) <= set(wordclass.CLASSES)
