"""The planted-structure language (docs/PLANTED.md): two small causal towers, CPU-sized.

  python -m twotower_jax.main --config=configs/planted.py --workdir=runs/planted_s0

SentencePiece runs as a word model, so every planted word is exactly one piece and
each piece has a known class (planted.token_classes). Changing a data.planted_* size
changes the vocabulary: validation then names the data.vocab_size to set.
"""

from twotower_jax import config as config_lib
from twotower_jax.data import planted


def get_config():
  c = config_lib.base_config()
  c.data.source = 'planted'
  c.data.tokenizer_type = 'word'
  c.data.vocab_size = planted.required_vocab_size(c.data)
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
  return c
