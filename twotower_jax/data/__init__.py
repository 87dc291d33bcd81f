"""Data: corpora from registered sources, SentencePiece, packed windows, the planted language.

Importing the package registers the built-in sources (sotu.py, text.py, tfds.py, planted.py).
"""

from twotower_jax.data import planted  # noqa: F401  (registers 'planted')
from twotower_jax.data import sotu  # noqa: F401  (registers 'sotu')
from twotower_jax.data import text  # noqa: F401  (registers 'text')
from twotower_jax.data import tfds  # noqa: F401  (registers 'tfds')
