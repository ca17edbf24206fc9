"""The teacher's sampler: bidirectional multi-step Euler on the probability-flow ODE, with
classifier-free guidance on a negative prompt (for baselines and ODE-initialisation pairs)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.diffusion.flow import NUM_TRAIN_TIMESTEPS


def euler_sample(module: Any,
                 params: Any,
                 noise: jax.Array,
                 context: jax.Array,
                 neg_context: jax.Array | None = None,
                 *,
                 timesteps: Sequence[float],
                 guidance_scale: float = 5.0,
                 return_trajectory: bool = False):
  """Integrates dx/ds = v from s = t_0/1000 down to t_N/1000 with Euler steps.

  Args:
    module, params: a bidirectional Wan DiT (`module.apply({'params': params}, x, t, context)`).
    noise: [B, F, H, W, C] the starting point x_{t_0} (pure noise when t_0 = 1000).
    context, neg_context: [B, L, D] text embeddings of the prompt and of the negative prompt.
    timesteps: decreasing grid [t_0, ..., t_N] in [0, 1000] (N steps; e.g. `shifted_timesteps(50)`).
    guidance_scale: w in v = v_neg + w (v_cond - v_neg); 1 (or no neg_context) disables CFG.
    return_trajectory: also return x at every grid point, [N + 1, B, F, H, W, C] (x at t_i).

  Returns:
    x at t_N ([B, F, H, W, C], float32), or (x, trajectory).
  """
  ts = np.asarray(timesteps, np.float64)
  if ts.ndim != 1 or len(ts) < 2 or np.any(np.diff(ts) >= 0):
    raise ValueError(f"timesteps must be a strictly decreasing grid of >= 2 values, got {ts}.")
  if ts[0] > NUM_TRAIN_TIMESTEPS or ts[-1] < 0:
    raise ValueError(f"timesteps must lie in [0, 1000], got {ts[0]}..{ts[-1]}.")
  use_cfg = neg_context is not None and guidance_scale != 1.0
  B = noise.shape[0]
  ctx = jnp.concatenate([context, neg_context], axis=0) if use_cfg else context

  def velocity(x, t):
    tb = jnp.full((B,), t, jnp.float32)
    if not use_cfg:
      return module.apply({"params": params}, x, tb, ctx)
    v = module.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([tb, tb]), ctx)
    v_cond, v_neg = v[:B], v[B:]
    return v_neg + guidance_scale * (v_cond - v_neg)

  def step(x, t_pair):
    t, t_next = t_pair
    v = velocity(x, t)
    x_next = x + ((t_next - t) / NUM_TRAIN_TIMESTEPS) * v
    return x_next, x

  pairs = jnp.asarray(np.stack([ts[:-1], ts[1:]], axis=1), jnp.float32)
  x, traj = jax.lax.scan(step, noise.astype(jnp.float32), pairs)
  if return_trajectory:
    return x, jnp.concatenate([traj, x[None]], axis=0)
  return x
