"""The paper's models (He & Toyoizumi): a tower type at the base or large size, window 128.

  python -m twotower_jax.main --config=configs/paper.py:causal,base --workdir=runs/causal_base
  python -m twotower_jax.main --config=configs/paper.py:mlm,large --workdir=runs/mlm_large \
      --config.train.steps=20000

The argument is TYPE,SIZE: TYPE a registered tower type (causal, mlm, bilstm), SIZE
base (12 layers, H=384, 12 heads) or large (24 layers, H=512, 16 heads), per tower,
MLP width 4H. The token table is the tower type's paper variant (its registered
`paper_embedding_mode`: GPT reads one shared V x H table, BERT and ELMo a V x (N*H)
table through per-tower projections). For bilstm, n_layers is each direction's LSTM
depth and n_heads is unused. Sized for an accelerator; data and schedule are
base_config()'s (override --config.train.steps=...), whose optimizer is the paper's.
The gate's head is the original code's (model.head: LayerNorm eps 1e-12, exact erf GELU,
torch.nn.Linear's default init), and attention towers drop attention probabilities at 0.1
as the original; its as-released defects (model.released.*) stay off. docs/FIDELITY.md
lists what still differs.
"""

from twotower_jax import config as config_lib
from twotower_jax.model import towers

SIZES = {'base': dict(n_layers=12, d_model=384, n_heads=12),
         'large': dict(n_layers=24, d_model=512, n_heads=16)}
WINDOW = 128


def get_config(arg='causal,base'):
  tower_type, _, size = (arg or 'causal,base').partition(',')
  size = size or 'base'
  if size not in SIZES:
    raise ValueError(f'configs/paper.py:{arg}: size {size!r} is not one of {sorted(SIZES)}; '
                     'use e.g. configs/paper.py:causal,base')
  c = config_lib.base_config()
  c.model.tower_type = tower_type
  for key, value in SIZES[size].items():
    c.model[key] = value
  c.model.d_mlp = 4 * c.model.d_model
  if tower_type in towers.TOWER_TYPES:  # else validation names the known types
    c.model.embedding.mode = towers.get(tower_type).paper_embedding_mode
    if towers.get(tower_type).attention_layers(c.model):  # the original's attention dropout
      c.model.attention_dropout = 0.1
  c.data.seq_len = c.model.max_len = WINDOW
  c.model.head.ln_eps, c.model.head.gelu, c.model.head.init = 1e-12, 'erf', 'torch_linear'
  return c
