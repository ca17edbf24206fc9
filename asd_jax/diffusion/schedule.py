"""Timestep schedules: the shifted grid, the warped few-step list, and FFE's per-chunk schedules.

Timesteps are floats in (0, 1000] (ALGORITHM.md sections 1 and 3). The shift maps s = t/1000 to
s' = shift * s / (1 + (shift - 1) * s); Self Forcing's generator uses shift 5, which warps the list
[1000, 750, 500, 250] into [1000, 937.5, 833.33.., 625].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000.0


def shift_sigma(s, shift: float):
  """s' = shift * s / (1 + (shift - 1) * s), elementwise (numpy or jax arrays, or floats)."""
  return shift * s / (1.0 + (shift - 1.0) * s)


def warp_timesteps(timesteps: Sequence[float], shift: float = 5.0) -> tuple[float, ...]:
  """Passes timesteps in [0, 1000] through the shift: [1000, 750, 500, 250] -> [1000, 937.5, ...]."""
  s = np.asarray(timesteps, np.float64) / NUM_TRAIN_TIMESTEPS
  return tuple(float(v) for v in shift_sigma(s, shift) * NUM_TRAIN_TIMESTEPS)


def few_step_schedule(num_steps: int = 4, shift: float = 5.0) -> tuple[float, ...]:
  """The warped list of `num_steps` equally spaced timesteps from 1000 (4 -> [1000, 937.5, ...])."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  base = NUM_TRAIN_TIMESTEPS * (1.0 - np.arange(num_steps) / num_steps)
  return warp_timesteps(base, shift)


def shifted_timesteps(num_steps: int, shift: float = 5.0) -> np.ndarray:
  """num_steps + 1 timesteps of the shifted Euler grid from 1000 down to 0 (float64)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  s = np.linspace(1.0, 0.0, num_steps + 1)
  return shift_sigma(s, shift) * NUM_TRAIN_TIMESTEPS


def validate_timesteps(timesteps: Sequence[float], name: str = "schedule") -> tuple[float, ...]:
  """A non-empty, strictly decreasing list of timesteps in (0, 1000], or a ValueError saying why."""
  try:
    ts = tuple(float(t) for t in timesteps)
  except TypeError as e:
    raise ValueError(f"{name} must be a list of timesteps in (0, 1000], got {timesteps!r}.") from e
  if not ts:
    raise ValueError(f"{name} is empty; give at least one timestep in (0, 1000].")
  bad = [t for t in ts if not 0.0 < t <= NUM_TRAIN_TIMESTEPS]
  if bad:
    raise ValueError(f"{name} has timesteps outside (0, 1000]: {bad}.")
  if any(b >= a for a, b in zip(ts, ts[1:])):
    raise ValueError(f"{name} must be strictly decreasing, got {list(ts)}.")
  return ts


def ffe_schedules(training_timesteps: Sequence[float], later_steps: int,
                  variant: str = "prefix") -> tuple[tuple[float, ...], tuple[float, ...]]:
  """First-Frame Enhancement: (first chunk schedule, later chunks schedule).

  The first chunk takes every training timestep; later chunks take `later_steps` of them:
  "prefix" the first n (exactly the n-step generation that random-exit training optimises, the
  default), "spread" every (N/n)-th (e.g. [1000, 833.3] for n = 2 of 4).
  """
  ts = validate_timesteps(training_timesteps, "training timesteps")
  n = len(ts)
  if not 1 <= later_steps <= n:
    raise ValueError(f"later_steps must be in [1, {n}], got {later_steps}.")
  if variant == "prefix":
    later = ts[:later_steps]
  elif variant == "spread":
    later = tuple(ts[i * n // later_steps] for i in range(later_steps))
  else:
    raise ValueError(f"FFE variant must be 'prefix' or 'spread', got {variant!r}.")
  return ts, later
