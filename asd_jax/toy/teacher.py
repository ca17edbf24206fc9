"""The analytic teacher: the toy world's exact flow velocity behind a Wan-like `apply`.

`AnalyticTeacher(world).apply({'params': {}}, x, t, context)` returns the velocity an exact model
of the world predicts, so it stands wherever the training code calls a bidirectional teacher (DMD's
real score, ODE pairs). The class of each row is read off its context: the nearest class text
embedding, or "unconditional" (every mode of every class) when the context is the null text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from asd_jax.toy.world import ToyWorld

Array = jax.Array


def class_of_context(world: ToyWorld, context: Array) -> tuple[Array, Array]:
  """(class index [B], unconditional [B] bool) of contexts [B, L, D] from the world's text table."""
  table = jnp.asarray(world.text, jnp.float32)  # [K, L, D]
  ctx = jnp.asarray(context, jnp.float32)
  if ctx.shape[1:] != table.shape[1:]:
    raise ValueError(f"context of shape {ctx.shape[1:]} per row; the toy world's text embeddings "
                     f"are {table.shape[1:]}.")
  d2 = jnp.sum((ctx[:, None] - table[None])**2, axis=(2, 3))  # [B, K]
  null = jnp.sum(ctx**2, axis=(1, 2)) < 1e-6 * ctx[0].size
  return jnp.argmin(d2, axis=1), null


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a static argument
class AnalyticTeacher:
  world: ToyWorld

  def apply(self, variables, x: Array, t: Array, context: Array, **kwargs) -> Array:
    """v [B, F, H, W, C] float32 of the exact posterior mean (per-row timesteps t [B])."""
    del variables
    if kwargs:
      raise ValueError(f"the analytic teacher is a plain bidirectional model; got {sorted(kwargs)}.")
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 1:
      raise ValueError(f"the analytic teacher takes one timestep per row ([B]), got {t.shape}.")
    cls, null = class_of_context(self.world, context)
    x0_c = self.world.posterior_mean(x, t, cls)
    x0_u = self.world.posterior_mean(x, t, None)
    x0 = jnp.where(null.reshape((-1,) + (1,) * (x.ndim - 1)), x0_u, x0_c)
    s = (t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return (x.astype(jnp.float32) - x0) / jnp.maximum(s, 1e-6)
