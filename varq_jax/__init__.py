"""varq-jax: VAR (visual autoregressive next-scale prediction) in JAX/Flax with Shift-and-Sum PTQ."""

__version__ = "0.1.0"
