"""Paper 'large' size (24 layers, H=512, 16 heads, window 128):
causal (GPT-style) transformer towers.

  python -m twotower_jax.main --config=configs/causal_large.py --workdir=runs/causal_large

Sized for an accelerator; the training schedule is base_config()'s (override
--config.train.steps=...). Sizes and embedding variant: twotower_jax/presets.py.
"""

from twotower_jax import presets


def get_config():
  return presets.paper('causal', 'large')
