"""Default main job: two causal towers on the State of the Union addresses, CPU-sized.

  python -m twotower_jax.main --config=configs/default.py --workdir=runs/default

Measured on a 2-core CPU: see README ("Numbers").
"""

from twotower_jax import config as config_lib


def get_config():
  return config_lib.base_config()
