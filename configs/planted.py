"""The planted-structure language (docs/PLANTED.md): two small causal towers, CPU-sized.

  python -m twotower_jax.main --config=configs/planted.py --workdir=runs/planted_s0
  python -m twotower_jax.validate --config=configs/planted.py:small --workdir=runs/validate
  python -m twotower_jax.validate --config=configs/planted.py:test --workdir=runs/validate_test \
      --gate_steps=60 --ladder=1,0.75,0.5 --pieces_rung=1 --pieces_vocab=38

SentencePiece runs as a word model, so every planted word is exactly one piece and
each piece has a known class (planted.token_classes). Changing a data.planted_* size
changes the vocabulary: validation then names the data.vocab_size to set.

`:small` is the size the validation (python -m twotower_jax.validate) runs at: 400
documents of 4 topics x 12 content words, window 64, towers of 2 layers with d=64 and
800 steps, which every seed takes past the topic-blind floor (docs/ANALYSIS.md,
"Known-answer validation"), so that two seeds are two equally trained towers.
`:test` is the CPU-test size (tests/test_validate.py and the published 20-replicate
validation): 160 documents, window 32, towers of 1 layer with d=32 and 3000 steps (about
20 s each; at 200 steps two seeds are still far from either floor and learn the two classes
to different degrees, docs/ANALYSIS.md).
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
  elif size == 'test':
    c.data.planted_docs, c.data.planted_topics, c.data.planted_topic_words = 160, 4, 12
    c.data.val_fraction = 0.2
    c.data.seq_len = c.model.max_len = 32
    c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_mlp = 1, 32, 2, 64
    c.train.steps, c.train.log_every = 3000, 50
    c.train.eval_every, c.train.checkpoint_every = 1000, 1500
    c.analysis.min_count, c.analysis.n_boot, c.analysis.n_perm = 10, 100, 999
    c.analysis.probe_windows = 64
  elif size:
    raise config_lib.ConfigError(f"configs/planted.py:{size}: the size is '' (default), "
                                 "'small' (validate's) or 'test' (its CPU-test size)")
  c.data.vocab_size = planted.required_vocab_size(c.data)
  return c
