"""Tiny CPU preset for any tower type (2 layers, H=64, window 64, vocab 2000, 200 steps).

  python -m twotower_jax.main --config=configs/tiny.py:mlm --workdir=runs/tiny_mlm

The text after ':' is model.tower_type (default causal): causal | mlm | bilstm; the
token table is that type's paper variant, as in configs/paper.py. The layers' scan is
unrolled (model.scan_unroll): the parameters of a scanned stack, without the loop that made
this small step about a quarter slower (docs/PERFORMANCE.md).
"""

from twotower_jax import config as config_lib
from twotower_jax.model import towers


def get_config(tower_type='causal'):
  c = config_lib.base_config()
  c.model.tower_type = tower_type or 'causal'
  if c.model.tower_type in towers.TOWER_TYPES:  # else validation names the known types
    c.model.embedding.mode = towers.get(c.model.tower_type).paper_embedding_mode
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_mlp = 2, 64, 2, 256
  c.model.scan_unroll = c.model.n_layers  # the scanned stack unrolled: same parameters, faster
  c.data.seq_len = c.model.max_len = 64
  c.data.vocab_size = 2000
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 200, 100, 100
  c.optimizer.warmup_steps = 20
  return c
