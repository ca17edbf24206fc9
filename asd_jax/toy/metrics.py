"""Exact quality metrics of generated toy videos (TOY.md "Metrics"), per class then averaged.

- nll_per_dim: negative log-likelihood per dimension under the true class density (the data's own
  value is the floor);
- precision: share of samples within the chi-square(D) `quantile` radius of a mode of their class;
- coverage: share of the class's modes that are the nearest mode of at least one sample;
- temporal_consistency: share of samples whose chunks all pick the same nearest mode, each chunk
  compared on its own frames (modes equal on a chunk's frames, like a pair before its fork, are
  all nearest there: a sample is consistent when one mode is nearest on every chunk);
- energy_distance: between the generated and fresh true samples of the class;
- step_similarity: cosine similarity of predicted x0 between every pair of denoising steps.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2

from asd_jax.toy.world import ToyWorld


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d2 = (np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2 * a @ b.T)
  return np.sqrt(np.maximum(d2, 0.0))


def _within(a: np.ndarray) -> float:
  """E|A - A'| over distinct pairs (the unbiased U-statistic; 0 for a single sample)."""
  n = len(a)
  return float(np.sum(_distances(a, a)) / (n * (n - 1))) if n > 1 else 0.0


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
  """2 E|X - Y| - E|X - X'| - E|Y - Y'| over flattened samples (unbiased U-statistic: near 0,
  possibly slightly negative, for two samples of one distribution)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  return 2 * float(np.mean(_distances(x, y))) - _within(x) - _within(y)


def class_metrics(world: ToyWorld, x: np.ndarray, cls: int, reference: np.ndarray, *,
                  chunk_frames: int = 3, quantile: float = 0.999) -> dict[str, float]:
  """Metrics of samples x [N, F, H, W, C] of class `cls` against true samples `reference`."""
  cfg = world.cfg
  x = np.asarray(x, np.float64)
  n = len(x)
  labels = np.full(n, cls)  # for the log-density
  mu = world.modes[cls].reshape(cfg.modes_per_class, -1)
  d2 = np.sum((x.reshape(n, 1, -1) - mu[None])**2, axis=-1) / cfg.sigma_d**2
  nearest = np.argmin(d2, axis=1)
  modes = world.modes[cls]
  agree = np.ones((n, cfg.modes_per_class), bool)  # modes nearest on every chunk so far
  for f in range(0, cfg.frames, chunk_frames):
    dist = np.sum((x[:, None, f:f + chunk_frames] - modes[None, :, f:f + chunk_frames])**2,
                  axis=(2, 3, 4, 5))
    agree &= dist <= dist.min(axis=1, keepdims=True) * (1 + 1e-12)
  return {
      "nll_per_dim": float(-np.mean(world.log_density(x, labels)) / cfg.dim),
      "precision": float(np.mean(np.min(d2, axis=1) <= chi2.ppf(quantile, cfg.dim))),
      "coverage": float(len(np.unique(nearest)) / cfg.modes_per_class),
      "temporal_consistency": float(np.mean(np.any(agree, axis=1))),
      "energy_distance": energy_distance(x, reference),
  }


def average(per_class: list[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in per_class])) for k in per_class[0]}


def step_similarity(x0_steps: np.ndarray) -> np.ndarray:
  """[S, S] mean cosine similarity of predicted x0 between steps; x0_steps [S, N, ...]."""
  flat = np.asarray(x0_steps, np.float64).reshape(x0_steps.shape[0], x0_steps.shape[1], -1)
  unit = flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
  return np.einsum("snd,tnd->st", unit, unit) / flat.shape[1]
