"""Tower-preference estimators: the registry (base.py) and one module per estimator."""

from twotower_jax.analysis.estimators import ablation  # noqa: F401  (registers 'ablation')
from twotower_jax.analysis.estimators import gate  # noqa: F401  (registers 'gate')
from twotower_jax.analysis.estimators import probe  # noqa: F401  (registers 'probe')
from twotower_jax.analysis.estimators.base import ESTIMATORS, Context, Estimator, get, register  # noqa: F401
