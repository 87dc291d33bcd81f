"""Word classes of SentencePiece pieces: gold UPOS from a CoNLL-U treebank, or a word list.

The syntax-vs-semantics reading of the tower split needs to know which
vocabulary items are function words (closed class) and which content words
(open class). With a treebank, each piece takes the majority gold UPOS of the
words it is part of (rule in `piece_classes`); without one, a built-in English
function-word list marks closed-class pieces.

The CoNLL-U reader is this module's own rather than the `conllu` package's: conllu 6.0
accepts a token line with missing columns without complaint and its parse errors carry
no line number, while every malformed line here is reported as file:line.
"""

from __future__ import annotations

import collections
import glob
import os
from typing import NamedTuple, Sequence

import numpy as np

from twotower_jax import errors

CLOSED_UPOS = ('DET', 'ADP', 'AUX', 'PRON', 'CCONJ', 'SCONJ', 'PART')  # function words
OPEN_UPOS = ('NOUN', 'PROPN', 'VERB', 'ADJ', 'ADV')
# The classes a piece can have: function word, content word, punctuation (tested apart from
# function words), word-internal piece (most occurrences inside a word, e.g. 'ing': no class
# of its own, left out of the class tests), '' (NUM, INTJ, SYM, X, digits, specials).
CLASSES = ('closed', 'open', 'punct', 'fragment', '')
SPIECE_SPACE = '\u2581'  # SentencePiece's word-boundary mark

# English function words (closed classes: determiners, prepositions, pronouns,
# auxiliaries and modals, conjunctions, particles), lower case, written for this project.
FUNCTION_WORDS = frozenset('''
a an the this that these those each every either neither some any no all both
half several many much few little more most other another such what which whose
whatever whichever my your his her its our their
about above across after against along amid among around as at before behind below
beneath beside besides between beyond but by despite down during except for from in
inside into like near of off on onto out outside over past per since through
throughout till to toward towards under underneath unlike until up upon versus via
with within without
i me mine myself you yours yourself yourselves he him himself she hers herself it
itself we us ours ourselves they them theirs themselves one oneself who whom
whoever whomever someone somebody something anyone anybody anything everyone
everybody everything nobody nothing none
am is are was were be been being have has had having do does did doing done will
would shall should can could may might must ought
and or nor so yet if because although though while whereas whether unless lest
than once where when whenever wherever why how
not n't 's 'll 've 're 'd 'm there here then
'''.split())


class ConllError(errors.UserError):
  """A CoNLL-U file that cannot be read; the message names file and line."""


class Sentence(NamedTuple):
  """One treebank sentence: syntactic words only (no multiword ranges, no empty nodes)."""
  forms: np.ndarray  # [n] str
  upos: np.ndarray  # [n] str
  heads: np.ndarray  # [n] int32: 1-based index of the head word, 0 = root
  deprel: np.ndarray  # [n] str
  space_after: np.ndarray  # [n] bool: a space follows the word in the raw text
  lines: np.ndarray  # [n] int32: line number of each word in its file


def read_conllu(path: str) -> list[Sentence]:
  """Sentences of a CoNLL-U file; ConllError names the file and line of bad input."""
  try:
    with open(path, encoding='utf-8') as f:
      text_lines = f.read().splitlines()
  except OSError as e:
    raise ConllError(f'cannot read CoNLL-U file {path}: {e.strerror}') from None
  except UnicodeDecodeError:
    raise ConllError(f'{path} is not UTF-8 text; give a CoNLL-U treebank') from None
  sentences: list[Sentence] = []
  rows: list[tuple] = []  # (form, upos, head, deprel, space_after, lineno)
  range_end, range_space = 0, True  # the open multiword token, if any

  def fail(lineno: int, what: str):
    raise ConllError(f'{path}:{lineno}: {what}; fix the CoNLL-U file (10 tab-separated columns, '
                     'integer ID and HEAD)')

  def finish():
    if not rows:
      return
    n = len(rows)
    for form, _, head, _, _, lineno in rows:
      if not 0 <= head <= n:
        fail(lineno, f'HEAD {head} of {form!r} is outside the sentence (1..{n} or 0)')
    forms, upos, heads, deprel, space, lines = zip(*rows)
    sentences.append(Sentence(np.array(forms, dtype=object), np.array(upos, dtype=object),
                              np.array(heads, np.int32), np.array(deprel, dtype=object),
                              np.array(space, bool), np.array(lines, np.int32)))
    rows.clear()

  for lineno, line in enumerate(text_lines, start=1):
    if not line.strip():
      finish()
      continue
    if line.startswith('#'):
      continue
    cols = line.split('\t')
    if len(cols) != 10:
      fail(lineno, f'{len(cols)} columns instead of 10')
    tok_id, form, _, upos, _, _, head, deprel, _, misc = cols
    no_space = 'SpaceAfter=No' in misc.split('|')
    if '-' in tok_id:  # multiword token a-b: its words follow; keep its SpaceAfter
      a, _, b = tok_id.partition('-')
      if not (a.isdigit() and b.isdigit() and int(a) <= int(b)):
        fail(lineno, f'bad multiword token ID {tok_id!r}')
      range_end, range_space = int(b), not no_space
      continue
    if '.' in tok_id:  # empty node of enhanced dependencies
      continue
    if not tok_id.isdigit():
      fail(lineno, f'ID {tok_id!r} is not an integer')
    if int(tok_id) != len(rows) + 1:
      fail(lineno, f'ID {tok_id} out of sequence (expected {len(rows) + 1})')
    try:
      head_i = int(head)
    except ValueError:
      fail(lineno, f'HEAD {head!r} is not an integer')
    i = int(tok_id)
    if i < range_end:
      space = False  # inside a multiword token: no space between its words
    elif i == range_end:
      space = range_space
    else:
      space = not no_space
    rows.append((form, upos, head_i, deprel, space, lineno))
  finish()
  return sentences


def conllu_files(spec: str) -> list[str]:
  """A file, a directory (its *.conllu) or a glob, as a sorted list of files."""
  if os.path.isdir(spec):
    files = sorted(glob.glob(os.path.join(spec, '*.conllu')))
  else:
    files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
  if not files:
    raise ConllError(f'no CoNLL-U files match {spec!r}; give a .conllu file, a directory '
                     'holding them, or a glob')
  return files


def read_treebank(spec: str) -> list[Sentence]:
  """All sentences of every CoNLL-U file `spec` names (see `conllu_files`)."""
  return [s for path in conllu_files(spec) for s in read_conllu(path)]


def sentence_text(sentence: Sentence) -> tuple[str, list[tuple[int, int]]]:
  """The raw text of a sentence rebuilt from its words, and each word's UTF-8 byte span."""
  parts, spans, pos = [], [], 0
  for form, space in zip(sentence.forms, sentence.space_after):
    n = len(form.encode('utf-8'))
    spans.append((pos, pos + n))
    parts.append(form + (' ' if space else ''))
    pos += n + (1 if space else 0)
  return ''.join(parts).rstrip(' '), spans


def tokenize_sentence(sp, sentence: Sentence) -> tuple[np.ndarray, np.ndarray]:
  """Piece ids of the sentence text and, per piece, the index of its word (-1: none).

  A piece belongs to the word whose bytes it overlaps most; a bare word-boundary
  piece covers only a space and belongs to no word.
  """
  text, spans = sentence_text(sentence)
  proto = sp.encode(text, out_type='proto')
  ids, owner = [], []
  starts = np.array([s for s, _ in spans])
  ends = np.array([e for _, e in spans])
  for piece in proto.pieces:
    overlap = np.minimum(ends, piece.end) - np.maximum(starts, piece.begin)
    best = int(np.argmax(overlap)) if overlap.size else -1
    ids.append(piece.id)
    owner.append(best if best >= 0 and overlap[best] > 0 else -1)
  return np.array(ids, np.int32), np.array(owner, np.int32)


def upos_class(upos: str) -> str:
  return ('closed' if upos in CLOSED_UPOS else 'open' if upos in OPEN_UPOS else
          'punct' if upos == 'PUNCT' else '')


def _is_special(sp, i: int) -> bool:
  return sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or (
      sp.id_to_piece(i).startswith('[') and sp.id_to_piece(i).endswith(']'))


def _is_punct(s: str) -> bool:
  return bool(s) and all(not c.isalnum() and not c.isspace() for c in s)


def read_word_classes(path: str) -> dict[str, str]:
  """A word-class list: one `word<TAB>closed|open` per line ('#' comments, blank lines ok)."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ConllError(f'cannot read the word-class list {path} ({e}); give a UTF-8 file of '
                     'word<TAB>closed|open lines') from None
  out = {}
  for lineno, line in enumerate(lines, start=1):
    if not line.strip() or line.startswith('#'):
      continue
    cols = line.split('\t')
    if len(cols) != 2 or cols[1].strip() not in ('closed', 'open') or not cols[0].strip():
      raise ConllError(f'{path}:{lineno}: expected word<TAB>closed|open, got {line[:60]!r}')
    out[cols[0].strip()] = cols[1].strip()
  if not out:
    raise ConllError(f'{path} lists no words; give word<TAB>closed|open lines')
  return out


def piece_classes(sp, conllu_path: str | None,
                  word_classes_path: str | None = None) -> dict[str, np.ndarray]:
  """Per vocabulary item: 'upos' ([V] str, '' unknown) and 'word_class' (one of CLASSES).

  With a treebank (`conllu_path`: file, directory or glob): every treebank sentence is
  tokenized as running text and each piece occurrence is attributed to the word it
  overlaps most. A piece whose occurrences are mostly word-internal (not the first piece
  of its word) is a 'fragment'; otherwise its UPOS is the majority gold UPOS over its
  word-initial occurrences (ties: alphabetical) and its class follows from that UPOS
  (PUNCT: 'punct'; NUM, INTJ, SYM, X: ''). Also returns 'upos_count' (word-initial
  occurrences the UPOS rests on) and 'upos_share' (the majority's fraction of them).
  With a word-class list instead (`word_classes_path`, read_word_classes): a piece that is
  a whole listed word (word-initial mark + the word) takes its class, for corpora no
  treebank covers (e.g. a constructed language). Without either: a punctuation-only
  piece is 'punct' (UPOS PUNCT), a word-initial piece whose word is in FUNCTION_WORDS
  'closed', another word-initial alphabetic piece 'open', an alphabetic piece without the
  word-initial mark a 'fragment'; the rest (digits, special symbols) ''. The list cannot
  tell a word-initial fragment (the first piece of a longer word) from a word.
  """
  vocab = sp.get_piece_size()
  upos_V = np.full(vocab, '', dtype=object)
  class_V = np.full(vocab, '', dtype=object)
  count_V = np.zeros(vocab, np.int64)
  share_V = np.zeros(vocab, np.float64)
  special = np.array([_is_special(sp, i) for i in range(vocab)])
  if conllu_path:
    counts: list[collections.Counter] = [collections.Counter() for _ in range(vocab)]
    internal = np.zeros(vocab, np.int64)
    for sentence in read_treebank(conllu_path):
      ids, owner = tokenize_sentence(sp, sentence)
      previous = -1
      for piece_id, word in zip(ids.tolist(), owner.tolist()):
        if word >= 0 and not special[piece_id]:
          if word == previous:
            internal[piece_id] += 1
          else:
            counts[piece_id][sentence.upos[word]] += 1
        previous = word
    for i, c in enumerate(counts):
      initial = sum(c.values())
      if internal[i] > initial:
        class_V[i] = 'fragment'
      elif c:
        tag, n = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        upos_V[i], class_V[i] = tag, upos_class(tag)
        count_V[i], share_V[i] = initial, n / initial
  elif word_classes_path:
    listed = read_word_classes(word_classes_path)
    for i in range(vocab):
      piece = sp.id_to_piece(i)
      if not special[i] and piece.startswith(SPIECE_SPACE) and piece[1:] in listed:
        class_V[i] = listed[piece[1:]]
  else:
    for i in range(vocab):
      if special[i]:
        continue
      piece = sp.id_to_piece(i)
      word = piece[1:] if piece.startswith(SPIECE_SPACE) else None
      if _is_punct(piece.lstrip(SPIECE_SPACE)):
        upos_V[i], class_V[i] = 'PUNCT', 'punct'
      elif word is not None and word.lower() in FUNCTION_WORDS:
        class_V[i] = 'closed'
      elif word is not None and word.isalpha():
        class_V[i] = 'open'
      elif word is None and piece.isalpha():
        class_V[i] = 'fragment'
  return {'upos': upos_V.astype(str), 'word_class': class_V.astype(str),
          'upos_count': count_V, 'upos_share': share_V}


def class_masks(word_class_V: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Boolean masks (closed, open) over the vocabulary."""
  wc = np.asarray(word_class_V)
  return wc == 'closed', wc == 'open'
