"""The preference study: do function and content words lean to different towers, in every
seed, for every tower type? causal, mlm and bilstm towers x 3 seeds + a one-tower control each.

  python -m twotower_jax.experiment --config=configs/experiments/preference.py:cpu --workdir=DIR
  python -m twotower_jax.experiment --config=configs/experiments/preference.py:paper --list

The argument is the scale:
- `cpu`: sized for a 2-core CPU (docs/EXPERIMENTS.md has the measured cost of a point and
  the whole study's estimate): configs/tiny.py's towers (2 layers, d=64, vocabulary 2000,
  window 64) for 2 epochs of the embedded State of the Union corpus, the probe and resample
  estimators, word classes from the UD English EWT treebank when one is found, and the
  class test at every kept checkpoint (4 per run).
- `paper`: the paper's base models (configs/paper.py:TYPE,base: the original's schedule,
  vocabulary and Wikipedia data) for accelerators, one point per job (launch/slurm_array.sh,
  launch/gke_indexed_job.yaml; docs/SCALING.md). Set the prepared TFDS folder with
  --config.overrides.data.tfds_data_dir=PATH and, where memory asks for it, more
  micro-batches with --config.overrides.train.grad_accum_steps=N.
"""

import ml_collections

from twotower_jax.experiment import spec

SCALES = ('cpu', 'paper')


def get_config(scale='cpu'):
  if scale not in SCALES:
    raise ValueError(f"configs/experiments/preference.py:{scale}: the scale is 'cpu' (2 CPU "
                     "cores, about 90 minutes) or 'paper' (accelerators)")
  c = spec.experiment_config()
  c.name = f'preference_{scale}'
  c.axes = ml_collections.ConfigDict({'model': {'tower_type': 'causal,mlm,bilstm'},
                                      'train': {'seed': '0,1,2'}})
  c.group_by = 'model.tower_type'
  c.controls = True
  c.treebank = 'auto'
  c.over_training = True
  o = c.overrides
  o.analysis = ml_collections.ConfigDict({'estimators': 'probe,resample'})
  if scale == 'cpu':
    # configs/tiny.py's towers (2 layers, d=64, vocabulary 2000, window 64): 47,619 training
    # windows, so 3,000 steps of 32 windows are 2 epochs. d=128 was measured to fit less than
    # one epoch of every point into the 90 minutes (docs/EXPERIMENTS.md).
    c.base = 'configs/tiny.py:{model.tower_type}'
    steps = 3000
    o.train = ml_collections.ConfigDict({
        'batch_size': 32, 'steps': steps, 'log_every': 50, 'eval_every': steps // 8,
        'eval_batches': 8, 'checkpoint_every': steps // 4, 'keep_checkpoints': 4})
    o.optimizer = ml_collections.ConfigDict({'warmup_steps': steps // 20})
  else:
    c.base = 'configs/paper.py:{model.tower_type},base'
    # Ten checkpoints of the 12,500 steps, all kept, for the class test over training.
    o.train = ml_collections.ConfigDict({'checkpoint_every': 1250, 'keep_checkpoints': 10,
                                         'grad_accum_steps': 10})
    o.data = ml_collections.ConfigDict({'tfds_data_dir': ''})
  return c
