"""Co-LLM deferral: does a latent gate over two domain experts send each domain's tokens to its
expert, and does the combination beat either expert alone? One-tower causal LMs with the
latent gate's per-tower tables, on one shared tokenizer, 2 seeds each: `both` (trained on
both eras), `old` (speeches of 1790-1899), `new` (1945-2026) and `gated` (old and new
composed through model.init_towers, towers frozen, only the gate's prior and the output bias
trained on both eras). Every point is scored on each era's held-out speeches.

  python -m twotower_jax.experiment --config=configs/experiments/deferral.py:cpu --workdir=DIR
  python -m twotower_jax.experiment --config=configs/experiments/deferral.py:paper --list

The argument is the scale:
- `cpu`: configs/tiny.py's model (2 layers, d=64, vocabulary 2000, window 64), 2,000 steps of
  32 windows per model and 600 for the gate.
- `paper`: configs/default.py's model (4 layers, d=256, vocabulary 8000) on accelerators,
  20,000 steps per model and 2,000 for the gate; one point per job (docs/SCALING.md), the
  gated points after the experts (the runner refuses them before).

The aggregation (twotower_jax/experiment/deferral.py) writes the loss per domain and the
gate's deferral shares; docs/RESULTS.md has the CPU result, docs/COMPANIONS.md the method.
"""

import ml_collections

from twotower_jax.experiment import spec

SCALES = ('cpu', 'paper')
OLD, NEW = '1790-1899', '1945-2026'
# What trains in the composition: the gate's prior (input LayerNorm and projection) and the
# shared output bias; the experts' towers and tables stay as trained.
GATE_ONLY = '^gate/(ln_in|gate)/|^embed/output_bias$'


def get_config(scale='cpu'):
  if scale not in SCALES:
    raise ValueError(f"configs/experiments/deferral.py:{scale}: the scale is 'cpu' (2 CPU "
                     "cores, about 30 minutes) or 'paper' (accelerators)")
  steps, gate_steps = (2000, 600) if scale == 'cpu' else (20_000, 2000)
  c = spec.experiment_config()
  c.name = f'deferral_{scale}'
  c.aggregation = 'deferral'
  c.analyse = False
  c.controls = False
  c.shared_tokenizer = True  # trained on `both`'s documents, the first point's
  c.treebank = ''
  c.variants = ml_collections.ConfigDict({
      'both': {'data': {'sotu_years': f'{OLD},{NEW}'}},
      'old': {'data': {'sotu_years': OLD}},
      'new': {'data': {'sotu_years': NEW}},
      'gated': {'data': {'sotu_years': f'{OLD},{NEW}'},
                'model': {'n_towers': 2, 'init_towers': '{point:old},{point:new}',
                          'dropout': 0.0},
                'train': {'trainable': GATE_ONLY, 'steps': gate_steps,
                          'eval_every': gate_steps // 4, 'checkpoint_every': gate_steps},
                'optimizer': {'warmup_steps': gate_steps // 10}}}, sort_keys=False)
  c.axes = ml_collections.ConfigDict({'train': {'seed': '0,1'}})
  # The held-out speeches of each era (analysis.eval_documents over every era's held-out ones).
  c.analyses = ml_collections.ConfigDict({
      'old': {'eval_documents': '^1[78]', 'estimators': 'gate'},
      'new': {'eval_documents': '^(194[5-9]|19[5-9]|20)', 'estimators': 'gate'}},
      sort_keys=False)
  o = c.overrides
  o.model = ml_collections.ConfigDict({'n_towers': 1, 'gate': 'latent',
                                       'embedding': {'mode': 'per_tower'},
                                       'latent': {'uniform_init': True}})
  o.mesh = ml_collections.ConfigDict({'tower': 1})
  o.train = ml_collections.ConfigDict({'steps': steps, 'eval_every': steps // 8,
                                       'checkpoint_every': steps, 'keep_checkpoints': 1})
  o.optimizer = ml_collections.ConfigDict({'warmup_steps': steps // 20})
  if scale == 'cpu':
    c.base = 'configs/tiny.py:causal'
    o.train.update({'batch_size': 32, 'log_every': 50, 'eval_batches': 16})
  else:
    c.base = 'configs/default.py'
  return c
