"""Weight tying's bias (Lopardo et al.): is a tied token table nearer an untied model's output
matrix than its input table, do output gradients dominate it early, do early layers contribute
less (tuned lens), and does scaling its input gradient reduce the bias? One-tower causal LMs
on one shared tokenizer, 2 seeds each: tied, untied, and tied with input_grad_scale 2, 5, 10.

  python -m twotower_jax.experiment --config=configs/experiments/tying.py:cpu --workdir=DIR
  python -m twotower_jax.experiment --config=configs/experiments/tying.py:paper --list

The argument is the scale:
- `cpu`: configs/tiny.py's model (2 layers, d=64, vocabulary 2000, window 64) as one tower,
  2,000 steps of 32 windows (1.3 epochs of the embedded corpus), then the tuned lens.
- `paper`: configs/paper.py:causal,base's model and schedule as one tower (12 layers, d=384,
  Wikipedia from TFDS: set --config.overrides.data.tfds_data_dir=PATH), one point per job.

The aggregation (twotower_jax/experiment/tying.py) compares every point's token matrices
(DIR/alignment/, the align command's report) and writes the bias per variant;
docs/RESULTS.md has the CPU result, docs/COMPANIONS.md the measures.
"""

import ml_collections

from twotower_jax.experiment import spec

SCALES = ('cpu', 'paper')


def get_config(scale='cpu'):
  if scale not in SCALES:
    raise ValueError(f"configs/experiments/tying.py:{scale}: the scale is 'cpu' (2 CPU "
                     "cores, about 30 minutes) or 'paper' (accelerators)")
  c = spec.experiment_config()
  c.name = f'tying_{scale}'
  c.aggregation = 'tying'
  c.controls = False
  c.shared_tokenizer = True
  c.n_boot = 200
  c.treebank = ''
  c.variants = ml_collections.ConfigDict({
      'tied': {'model': {'embedding': {'tied': True}}},
      'untied': {'model': {'embedding': {'tied': False}}},
      **{f'tied_scale{s}': {'model': {'embedding': {'tied': True, 'input_grad_scale': float(s)}}}
         for s in (2, 5, 10)}}, sort_keys=False)
  c.axes = ml_collections.ConfigDict({'train': {'seed': '0,1'}})
  o = c.overrides
  o.model = ml_collections.ConfigDict({'n_towers': 1})
  o.mesh = ml_collections.ConfigDict({'tower': 1})
  # The lens is what is read; the one estimator asked for is skipped on one tower.
  o.analysis = ml_collections.ConfigDict({'lens': True, 'estimators': 'resample'})
  if scale == 'cpu':
    c.base = 'configs/tiny.py:causal'
    steps = 2000
    o.train = ml_collections.ConfigDict({
        'batch_size': 32, 'steps': steps, 'log_every': 25, 'eval_every': steps // 6,
        'eval_batches': 16, 'checkpoint_every': steps // 2, 'keep_checkpoints': 1})
    o.optimizer = ml_collections.ConfigDict({'warmup_steps': steps // 20})
  else:
    c.base = 'configs/paper.py:causal,base'
    o.data = ml_collections.ConfigDict({'tfds_data_dir': ''})
  return c
