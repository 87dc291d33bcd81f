"""twotower_jax: two-tower language models in JAX/Flax; see README.md."""
