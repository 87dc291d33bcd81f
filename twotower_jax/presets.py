"""Model presets for configs/: the paper's sizes per tower type, and tiny CPU runs.

The paper (DESIGN.md section 2) trains every tower type at two sizes with a window of
128 tokens: base = 12 layers, H=384, 12 heads; large = 24 layers, H=512, 16 heads
(per tower; MLP width 4H). GPT towers read one shared V x H table; the BERT (mlm)
and ELMo (bilstm) variants read a V x (N*H) table through per-tower projections.
For bilstm, `n_layers` is the depth of each direction's LSTM stack and `n_heads` is
unused. The optimizer defaults of `base_config()` are already the paper's.
"""

from __future__ import annotations

import ml_collections

from twotower_jax import config as config_lib

SIZES = {'base': dict(n_layers=12, d_model=384, n_heads=12),
         'large': dict(n_layers=24, d_model=512, n_heads=16)}
WINDOW = 128
EMBEDDING_MODE = {'causal': 'shared', 'mlm': 'projected', 'bilstm': 'projected'}


def paper(tower_type: str, size: str) -> ml_collections.ConfigDict:
  """base_config() with the paper's tower type, size and window."""
  c = config_lib.base_config()
  c.model.tower_type = tower_type
  for key, value in SIZES[size].items():
    c.model[key] = value
  c.model.d_mlp = 4 * c.model.d_model
  c.model.embedding.mode = EMBEDDING_MODE.get(tower_type, 'shared')
  c.data.seq_len = c.model.max_len = WINDOW
  return c


def tiny(tower_type: str) -> ml_collections.ConfigDict:
  """A CPU smoke run of any tower type: 2 layers, H=64, window 64, 200 steps."""
  c = config_lib.base_config()
  c.model.tower_type = tower_type
  c.model.embedding.mode = EMBEDDING_MODE.get(tower_type, 'shared')
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.d_mlp = 2, 64, 2, 256
  c.data.seq_len = c.model.max_len = 64
  c.data.vocab_size = 2000
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 200, 100, 100
  c.optimizer.warmup_steps = 20
  return c
