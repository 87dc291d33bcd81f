"""Tiny CPU preset for any tower type (2 layers, H=64, window 64, 200 steps).

  python -m twotower_jax.main --config=configs/tiny.py:mlm --workdir=runs/tiny_mlm

The text after ':' is model.tower_type (default causal): causal | mlm | bilstm.
"""

from twotower_jax import presets


def get_config(tower_type='causal'):
  return presets.tiny(tower_type or 'causal')
