"""The model: token tables, N stacked towers of a registered type, a registered gate.

Importing the package registers the built-in tower types (transformer.py, bilstm.py);
the built-in gates live in gates.py.
"""

from twotower_jax.model import bilstm  # noqa: F401  (registers 'bilstm')
from twotower_jax.model import transformer  # noqa: F401  (registers 'causal', 'mlm')
