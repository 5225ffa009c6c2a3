"""demkd_jax: DE-MKD (decoupled multi-teacher knowledge distillation based on entropy) in JAX/Flax."""

__version__ = "0.1.0"
