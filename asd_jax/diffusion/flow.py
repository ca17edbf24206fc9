"""Wan's flow-matching conventions (ALGORITHM.md section 1).

x_t = (1 - s) x0 + s eps with s = t / 1000; the network predicts v = eps - x0, so
x0 = x_t - s v and eps = x_t + (1 - s) v. Timesteps t are floats in [0, 1000], shaped [B] (one per
sample, broadcast over the video) or [B, F] (one per latent frame).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000.0


def sigma(t: jax.Array, like: jax.Array) -> jax.Array:
  """s = t / 1000 shaped to broadcast against a [B, F, H, W, C] video `like`.

  t: [B] or [B, F].
  """
  s = jnp.asarray(t, jnp.float32) / NUM_TRAIN_TIMESTEPS
  if s.ndim == 1:
    return s.reshape((-1,) + (1,) * (like.ndim - 1))
  if s.ndim == 2:
    return s.reshape(s.shape + (1,) * (like.ndim - 2))
  raise ValueError(f"timesteps must be [B] or [B, F], got shape {s.shape}.")


def add_noise(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - s) x0 + s eps."""
  s = sigma(t, x0)
  return (1.0 - s) * x0 + s * eps


def x0_from_v(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """x0 = x_t - s v."""
  return x_t - sigma(t, x_t) * v


def eps_from_v(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """eps = x_t + (1 - s) v."""
  return x_t + (1.0 - sigma(t, x_t)) * v


def v_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  """The flow velocity the network regresses onto: v = eps - x0."""
  return eps - x0
