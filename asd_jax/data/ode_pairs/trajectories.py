"""The teacher's side of ODE pairs: the Euler grid, the examples' noise, and the guided solve.

Example i starts from the noise `normal(fold_in(key(seed), i))` of shape [F, H, W, C] (latent
frames, height, width, channels), a function of (seed, i) only. The teacher integrates the
probability-flow ODE from it with `euler_sample` on the shifted grid of `steps` steps, with
classifier-free guidance against the negative prompt. The warped training timesteps
(`training_timesteps` passed through the shift: [1000, 750, 500, 250] -> [1000, 937.5, 833.33,
625]) must be points of that grid (48 steps with shift 5 gives exactly these four); x at them is
kept as `noisy` [K, F, H, W, C], the ODE's end at t = 0 as `clean` [F, H, W, C].

The trainer's ODE initialisation calls `generate_pairs` when it makes pairs on the fly, and the
dataset builder (`writer`) when it stores them: one solve for both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.data import build
from asd_jax.diffusion import schedule
from asd_jax.diffusion.euler import euler_sample

DEFAULT_TRAINING_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)
MAX_INT32 = 2**31 - 1  # seeds and example indices are int32
_GRID_ATOL = 1e-6  # timestep units; grid and warped values differ only by float64 rounding


class OdePairError(build.BuildError):
  """Bad settings or inputs for an ODE-pair build."""


@dataclasses.dataclass(frozen=True)
class OdeTimesteps:
  """The sampler's grid and where the training timesteps lie on it.

  Attributes:
    grid: steps + 1 timesteps from 1000 down to 0 (float64 values, as `shifted_timesteps`).
    timesteps: the K training timesteps, as the grid values x is kept at.
    indices: their positions in `grid` (x at timesteps[k] is the trajectory's entry indices[k]).
  """
  grid: tuple[float, ...]
  timesteps: tuple[float, ...]
  indices: tuple[int, ...]


def ode_timesteps(steps: int = 48, shift: float = 5.0,
                  training_timesteps: Sequence[float] = DEFAULT_TRAINING_TIMESTEPS) -> OdeTimesteps:
  """Places the warped training timesteps on the shifted Euler grid of `steps` steps.

  Args:
    steps: Euler steps of the teacher (the grid has steps + 1 points, 1000 to 0).
    shift: the timestep shift of the grid, also applied to `training_timesteps`.
    training_timesteps: unwarped, strictly decreasing, in (0, 1000] ([1000, 750, 500, 250]).
  Raises:
    OdePairError: a warped training timestep is not a grid point (the message lists the grid and
      step counts that would work), or bad arguments.
  """
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise OdePairError(f"steps must be an int >= 1, got {steps!r}.")
  if not np.isfinite(shift) or shift <= 0:
    raise OdePairError(f"shift must be a positive number, got {shift!r}.")
  try:
    unwarped = schedule.validate_timesteps(training_timesteps, "training timesteps")
  except ValueError as e:
    raise OdePairError(str(e)) from e
  grid = schedule.shifted_timesteps(int(steps), shift)
  warped = schedule.warp_timesteps(unwarped, shift)
  indices, off = [], []
  for t in warped:
    hits = np.nonzero(np.isclose(grid, t, rtol=0.0, atol=_GRID_ATOL))[0]
    if hits.size:
      indices.append(int(hits[0]))
    else:
      off.append(t)
  if off:
    # t lies on the grid iff (t / 1000) * steps is an integer, so the good counts are the
    # multiples of the smallest one.
    good = next((n for n in range(1, 10001)
                 if all(abs(u / 1000 * n - round(u / 1000 * n)) < 1e-9 for u in unwarped)), None)
    hint = (f"use a multiple of {good} steps" if good else
            "no step count up to 10000 fits them; choose other training timesteps")
    raise OdePairError(
        f"training timesteps {[round(t, 4) for t in off]} (warped with shift {shift} from "
        f"{list(unwarped)}) are not points of the {steps}-step grid with shift {shift}, so the "
        f"teacher's trajectory never passes through them. Grid: "
        f"{[round(float(t), 4) for t in grid]}. To put every training timestep on the grid, "
        f"{hint}.")
  return OdeTimesteps(tuple(float(t) for t in grid), tuple(float(grid[i]) for i in indices),
                      tuple(indices))


def check_sizes(frames: Any, height: Any, width: Any, batch_size: Any) -> None:
  """OdePairError when a latent size or the batch size is not an int >= 1."""
  for flag, v in (("frames", frames), ("height", height), ("width", width),
                  ("batch_size", batch_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise OdePairError(f"{flag} must be an int >= 1, got {v!r}.")


def check_seed(seed: Any) -> int:
  """The seed as an int, or OdePairError when it is not an int in [0, 2^31)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
      0 <= seed <= MAX_INT32):
    raise OdePairError(f"seed must be an int in [0, 2^31), got {seed!r}.")
  return int(seed)


@functools.partial(jax.jit, static_argnames="latent_shape")
def example_noise(seed: int | jax.Array, example_indices: Any,
                  latent_shape: Sequence[int]) -> jax.Array:
  """The starting noise of examples: a function of (seed, example index) only.

  Args:
    seed: int in [0, 2^31) (an int32 scalar).
    example_indices: [B] ints in [0, 2^31).
    latent_shape: (F, H, W, C), a tuple (static).
  Returns:
    [B, F, H, W, C] float32; row b is `normal(fold_in(key(seed), example_indices[b]), shape)`.
  """
  key = jax.random.key(seed)
  shape = tuple(int(s) for s in latent_shape)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(
      jnp.asarray(example_indices, jnp.int32))


@functools.partial(jax.jit, static_argnames=("module", "latent_shape", "grid", "indices",
                                             "guidance_scale"))
def solve_pairs(params, seed, example_indices, context, neg_context, *, module, latent_shape,
                grid, indices, guidance_scale):
  """`generate_pairs`' jitted program (the planner compiles it as the builder runs it)."""
  noise = example_noise(seed, example_indices, latent_shape)
  clean, traj = euler_sample(module, params, noise, context, neg_context, timesteps=grid,
                             guidance_scale=guidance_scale, return_trajectory=True)
  return jnp.moveaxis(traj[np.asarray(indices)], 0, 1), clean


def generate_pairs(module: Any, params: Any, example_indices: Any, context: Any,
                   neg_context: Any, *, seed: int, latent_shape: Sequence[int],
                   timesteps: OdeTimesteps, guidance_scale: float = 6.0
                   ) -> tuple[jax.Array, jax.Array]:
  """Teacher trajectories from the examples' noise, kept at the training timesteps (jitted).

  Args:
    module, params: the bidirectional teacher (a Wan DiT).
    example_indices: [B] example indices (they pick the noise, with `seed`).
    context, neg_context: [B, L, D] prompt and negative-prompt contexts.
    seed: the build's seed.
    latent_shape: (F, H, W, C).
    timesteps: from `ode_timesteps`.
    guidance_scale: CFG weight on the negative prompt (v = v_neg + w (v_cond - v_neg)).
  Returns:
    (noisy [B, K, F, H, W, C], clean [B, F, H, W, C]), float32: x of
    `euler_sample(..., timesteps=timesteps.grid, return_trajectory=True)` at `timesteps.indices`,
    and its end.
  """
  return solve_pairs(params, jnp.int32(check_seed(seed)), jnp.asarray(example_indices, jnp.int32),
                jnp.asarray(context), jnp.asarray(neg_context), module=module,
                latent_shape=tuple(int(s) for s in latent_shape), grid=tuple(timesteps.grid),
                indices=tuple(timesteps.indices), guidance_scale=float(guidance_scale))

