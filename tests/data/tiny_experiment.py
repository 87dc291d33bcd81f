"""A 2 x 2 experiment (causal, mlm x seeds 0, 1, + a one-tower control each) small enough for
the tests: conftest's tiny model on the text files of the glob given after ':', 6 steps, a
cheap analysis at every kept checkpoint.

  python -m twotower_jax.experiment --config=tests/data/tiny_experiment.py:/path/*.txt --workdir=DIR
"""

import ml_collections

from twotower_jax.experiment import spec


def get_config(text_glob=''):
  c = spec.experiment_config()
  c.name = 'tiny'
  c.base = 'configs/tiny.py:{model.tower_type}'
  c.axes = ml_collections.ConfigDict({'model': {'tower_type': 'causal,mlm'},
                                      'train': {'seed': '0,1'}})
  c.group_by = 'model.tower_type'
  c.treebank = ''
  c.over_training = True
  c.n_boot = 50
  c.overrides = ml_collections.ConfigDict({
      'data': {'source': 'text', 'text_glob': text_glob, 'val_fraction': 0.25,
               'vocab_size': 256, 'seq_len': 32},
      'model': {'n_layers': 2, 'd_model': 32, 'n_heads': 2, 'd_mlp': 64, 'max_len': 32},
      'train': {'steps': 6, 'batch_size': 8, 'log_every': 3, 'eval_every': 3,
                'eval_batches': 2, 'checkpoint_every': 3, 'keep_checkpoints': 2},
      'optimizer': {'warmup_steps': 2},
      'analysis': {'estimators': 'probe,resample', 'probe_windows': 16, 'probe_steps': 30,
                   'probe_eval_every': 10, 'probe_warmup': 5, 'n_perm': 99, 'n_control': 49,
                   'n_boot': 50, 'min_count': 3, 'token_view_passages': 1},
  })
  return c
