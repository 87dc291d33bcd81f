"""Paper 'base' size (12 layers, H=384, 12 heads, window 128):
masked-LM (BERT-style) bidirectional transformer towers.

  python -m twotower_jax.main --config=configs/mlm_base.py --workdir=runs/mlm_base

Sized for an accelerator; the training schedule is base_config()'s (override
--config.train.steps=...). Sizes and embedding variant: twotower_jax/presets.py.
"""

from twotower_jax import presets


def get_config():
  return presets.paper('mlm', 'base')
