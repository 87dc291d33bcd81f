"""The planted-structure language (docs/PLANTED.md): two small causal towers, CPU-sized.

  python -m twotower_jax.main --config=configs/planted.py --workdir=runs/planted_s0
  python -m twotower_jax.validate --config=configs/planted.py:small --workdir=runs/validate

SentencePiece runs as a word model, so every planted word is exactly one piece and
each piece has a known class (planted.token_classes). Changing a data.planted_* size
changes the vocabulary: validation then names the data.vocab_size to set.

`:small` is the size the validation (python -m twotower_jax.validate) runs at: 400
documents of 4 topics x 12 content words, window 64, towers of 2 layers with d=64 and
800 steps, which every seed takes past the topic-blind floor (docs/ANALYSIS.md,
"Known-answer validation"), so that two seeds are two equally trained towers.
"""

from twotower_jax import config as config_lib
from twotower_jax.data import planted


def get_config(size=''):
  c = config_lib.base_config()
  c.data.source = 'planted'
  c.data.tokenizer_type = 'word'
  c.data.val_fraction = 0.05
  c.data.seq_len = 128
  c.model.n_layers = 2
  c.model.d_model = 128
  c.model.n_heads = 4
  c.model.d_mlp = 512
  c.train.steps = 900  # 300 steps learn almost none of the topic (docs/PLANTED.md)
  c.train.eval_every = 150
  c.train.checkpoint_every = 300
  c.optimizer.warmup_steps = 30
  c.analysis.primary = 'resample/planted'  # the planted classes are what this corpus tests
  if size == 'small':
    c.data.planted_docs, c.data.planted_topics, c.data.planted_topic_words = 400, 4, 12
    c.data.val_fraction = 0.2
    c.data.seq_len = c.model.max_len = 64
    c.model.d_model, c.model.d_mlp = 64, 128
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 800, 200, 400
    c.analysis.min_count = 10
  elif size:
    raise config_lib.ConfigError(f"configs/planted.py:{size}: the size is '' (default) or "
                                 "'small' (validate's)")
  c.data.vocab_size = planted.required_vocab_size(c.data)
  return c
