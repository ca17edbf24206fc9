"""Causal chunk-by-chunk generation with a KV cache and First-Frame Enhancement."""

from asd_jax.sampling.causal import chunk_key, generate, validate_generation

__all__ = ["chunk_key", "generate", "validate_generation"]
