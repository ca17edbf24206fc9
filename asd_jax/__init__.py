"""asd_jax: Adversarial Self-Distillation for one-step causal video generation, in JAX."""

__version__ = "0.1.0"
