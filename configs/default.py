"""Default main job: two causal towers on the State of the Union addresses, CPU-sized.

  python -m twotower_jax.main --config=configs/default.py --workdir=runs/default

Measured on a 2-core CPU: see README ("Numbers").
"""

from twotower_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  # 4 layers: unrolled is ~10% faster per step on CPU than the scanned layer body
  # (docs/PERFORMANCE.md); deep presets keep scan_layers for fast compiles.
  c.model.scan_layers = False
  # Six checkpoints (steps 40..240) for `analyze --steps=all`: preference over training.
  c.train.checkpoint_every = 40
  c.train.keep_checkpoints = 6
  return c
