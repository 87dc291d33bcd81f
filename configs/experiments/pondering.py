"""Pondering against size: does a model that ponders match a vanilla one with about twice
the parameters (PonderingLM's finding)? One-tower causal LMs, 2 seeds each: vanilla, pondering
with 1, 2 and 3 extra passes at the same width, and vanilla models with about 1.5x and 2x
the parameters (more layers); eval loss at equal tokens and at equal training FLOPs.

  python -m twotower_jax.experiment --config=configs/experiments/pondering.py:cpu --workdir=DIR
  python -m twotower_jax.experiment --config=configs/experiments/pondering.py:paper --list

The argument is the scale:
- `cpu`: configs/tiny.py's model (2 layers, d=64, vocabulary 2000, window 64) as one tower,
  1,200 steps of 32 windows (0.8 epoch of the embedded corpus: the 3-pass model costs 5.6x
  the vanilla one, and the whole study has to fit about 45 minutes); 4 and 7 layers are
  1.42x and 2.05x its parameters.
- `paper`: configs/paper.py:causal,base's model and schedule as one tower (12 layers, d=384,
  Wikipedia from TFDS: set --config.overrides.data.tfds_data_dir=PATH); 21 and 31 layers are
  about 1.5x and 2x its parameters. One point per job (docs/SCALING.md).

Pondering uses the project's defaults (model.pondering.*: temperature 1, no sqrt(d) scale,
first embedding weight 1); the training FLOPs count every pass (twotower_jax/train/flops.py).
docs/RESULTS.md has the CPU result, docs/COMPANIONS.md the method.
"""

import ml_collections

from twotower_jax.experiment import spec

SCALES = ('cpu', 'paper')
LAYERS = {'cpu': (2, 4, 7), 'paper': (12, 21, 31)}  # vanilla, about 1.5x and 2x the parameters


def get_config(scale='cpu'):
  if scale not in SCALES:
    raise ValueError(f"configs/experiments/pondering.py:{scale}: the scale is 'cpu' (2 CPU "
                     "cores, about 45 minutes) or 'paper' (accelerators)")
  c = spec.experiment_config()
  c.name = f'pondering_{scale}'
  c.aggregation = 'loss'
  c.analyse = False
  c.controls = False
  _, wide, wider = LAYERS[scale]
  c.variants = ml_collections.ConfigDict({
      'vanilla': {},
      **{f'ponder{s}': {'model': {'pondering': {'steps': s}}} for s in (1, 2, 3)},
      f'layers{wide}': {'model': {'n_layers': wide}},
      f'layers{wider}': {'model': {'n_layers': wider}}}, sort_keys=False)  # vanilla first
  c.axes = ml_collections.ConfigDict({'train': {'seed': '0,1'}})
  o = c.overrides
  o.model = ml_collections.ConfigDict({'n_towers': 1})
  o.mesh = ml_collections.ConfigDict({'tower': 1})
  if scale == 'cpu':
    c.base = 'configs/tiny.py:causal'
    steps = 1200
    o.train = ml_collections.ConfigDict({
        'batch_size': 32, 'steps': steps, 'log_every': 50, 'eval_every': steps // 20,
        'eval_batches': 16, 'checkpoint_every': steps // 2, 'keep_checkpoints': 1})
    o.optimizer = ml_collections.ConfigDict({'warmup_steps': steps // 20})
  else:
    c.base = 'configs/paper.py:causal,base'
    o.train = ml_collections.ConfigDict({'eval_every': 250})
    o.data = ml_collections.ConfigDict({'tfds_data_dir': ''})
  return c
