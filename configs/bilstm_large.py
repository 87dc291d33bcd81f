"""Paper 'large' size (24 layers, H=512, 16 heads, window 128):
ELMo-style forward+backward LSTM towers.

  python -m twotower_jax.main --config=configs/bilstm_large.py --workdir=runs/bilstm_large

Sized for an accelerator; the training schedule is base_config()'s (override
--config.train.steps=...). Sizes and embedding variant: twotower_jax/presets.py.
"""

from twotower_jax import presets


def get_config():
  return presets.paper('bilstm', 'large')
