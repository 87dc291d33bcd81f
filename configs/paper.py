"""The paper's models (He & Toyoizumi): a tower type at the base or large size, with the
original's phase-1 schedule, vocabulary size, window and data.

  python -m twotower_jax.main --config=configs/paper.py:causal,base --workdir=runs/causal_base
  python -m twotower_jax.main --config=configs/paper.py:mlm,large --dry_run=v5p-8

The argument is TYPE,SIZE: TYPE a registered tower type (causal, mlm, bilstm), SIZE
base (12 layers, H=384, 12 heads) or large (24 layers, H=512, 16 heads), per tower,
MLP width 4H. The token table is the tower type's paper variant (its registered
`paper_embedding_mode`: GPT reads one shared V x H table, BERT and ELMo a V x (N*H)
table through per-tower projections), and the type's registered `paper_fields` set the
original's architecture (docs/FIDELITY.md B1-B4): mlm has BERT's embedding LayerNorm, a
head as wide as the table and no per-tower final LayerNorm; bilstm has ELMo's sizes
instead of the transformer's (per direction 2 LSTM layers of 2048 (base) / 4096 (large)
between 256-wide interfaces, no residual, no positions; n_heads unused) and the same
head, one embedding LayerNorm per direction. The gate's head is the original code's
(model.head: LayerNorm eps 1e-12, exact erf GELU, torch.nn.Linear's default init), and
attention towers drop attention probabilities at 0.1 as the original; its as-released
defects (model.released.*) stay off. The analysis's probes read what the original's
phase 2/3 probes read (PROBES; docs/FIDELITY.md, A4), which needs the concat gate (a
different model.gate also needs --config.analysis.probe_input=tower).

Schedule (SCHEDULE; docs/FIDELITY.md, A5): 5,120 windows of 128 tokens per optimizer step,
accumulated over 10 micro-batches, 12,500 steps with a linear warm-up of 1,000 steps and a
linear decay to zero, AdamW as base_config() (the original's values), a 30,528-piece
SentencePiece vocabulary, bfloat16 compute. Data (DATA): English Wikipedia from TFDS, read
from an array_record copy (docs/DATA.md, tfds); BookCorpus has no TFDS counterpart:
pg19 is the stand-in (data.tfds_name can list both). Sized for accelerators: see the
time and memory first with --dry_run=TARGET. docs/FIDELITY.md lists what still differs.
"""

from twotower_jax import config as config_lib
from twotower_jax.model import towers

SIZES = {'base': dict(n_layers=12, d_model=384, n_heads=12),
         'large': dict(n_layers=24, d_model=512, n_heads=16)}
WINDOW = 128

# The original's phase-1 run (hezq06/twotower_lm at e8b468e; docs/FIDELITY.md, A5): 5,120 =
# micro-batches of 128 x 10 accumulation steps x 4 data-parallel processes; 25 epochs of 5,000
# micro-batches = 125,000 micro-batches = 12,500 optimizer steps; --warm_up_steps 10000 counts
# micro-batches (its lr_schedule reads the micro-batch index), so 1,000 optimizer steps, then
# lr_linear_decay 1.0: linear to zero at the end (optimizer.schedule has this shape). Eval and
# checkpoints once per original epoch (500 steps); 12 eval batches of 5,120 windows are about
# the original's 500 x 128 validation windows per epoch.
SCHEDULE = {'train.batch_size': 5120, 'train.grad_accum_steps': 10, 'train.steps': 12_500,
            'optimizer.warmup_steps': 1_000, 'train.eval_every': 500,
            'train.checkpoint_every': 500, 'train.log_every': 50, 'train.eval_batches': 12,
            'data.vocab_size': 30_528, 'data.tokenizer_type': 'bpe', 'model.dtype': 'bfloat16'}
# The TFDS dataset closest to the original's WikiText + BookCorpus: English Wikipedia (one
# 'train' split, so the last 1% of its articles is held out). The whole split is read into host
# memory; data.tfds_max_docs bounds it.
DATA = {'data.source': 'tfds', 'data.tfds_name': 'wikipedia/20230601.en',
        'data.tfds_train_split': 'train[:99%]', 'data.tfds_val_split': 'train[99%:]',
        'data.tfds_text_key': 'text'}

# The original's phase 2/3 probes (docs/FIDELITY.md, A4): probe k reads slice k of the head's
# joint LayerNorm over [h_1; h_2], the frozen towers run with dropout on, and each probe is its
# own run with its own seed.
PROBES = {'analysis.probe_input': 'joint_ln', 'analysis.probe_dropout': True,
          'analysis.probe_seed_per_tower': True}


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
    # The original's architecture switches (mlm: BERT's, bilstm: ELMo's sizes and parts).
    config_lib.set_fields(c, towers.get(tower_type).paper_fields(size))
  c.data.seq_len = c.model.max_len = WINDOW
  c.model.head.ln_eps, c.model.head.gelu, c.model.head.init = 1e-12, 'erf', 'torch_linear'
  config_lib.set_fields(c, {**SCHEDULE, **DATA, **PROBES})
  return c
