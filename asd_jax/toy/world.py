"""The toy world: classes ("prompts") of Gaussian mixtures over small latent videos.

Each of K classes has M equally weighted modes; a mode mu_m is a smooth latent video [F, H, W, C]:
a Gaussian blob whose centre moves with a mode-specific velocity, times a mode-specific colour
over the C channels. Modes come in pairs that share their start, velocity and colour up to a fork
frame and part ways after it, so a causal generator must use its context to stay in one mode.
A sample is mu_m + sigma_d * z. Closed forms (TOY.md), with x_t = (1 - s) x0 + s eps:
  p(x_t | m) = N((1 - s) mu_m, v_s I),  v_s = (1 - s)^2 sigma_d^2 + s^2,
  w_m(x_t) = softmax_m(log pi_m - |x_t - (1 - s) mu_m|^2 / (2 v_s)),
  E[x0 | x_t, m] = mu_m + ((1 - s) sigma_d^2 / v_s) (x_t - (1 - s) mu_m),
  E[x0 | x_t] = sum_m w_m E[x0 | x_t, m],  v = (x_t - E[x0 | x_t]) / s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  num_classes: int = 4
  modes_per_class: int = 4  # even: modes come in pairs sharing their first frames
  frames: int = 9
  height: int = 8
  width: int = 8
  channels: int = 4
  sigma_d: float = 0.1
  fork_frame: int = 3  # paired modes are equal on frames [0, fork_frame)
  blob_width: float = 1.6  # Gaussian blob standard deviation, in pixels
  text_tokens: int = 4
  text_dim: int = 32
  seed: int = 0

  def __post_init__(self):
    if self.modes_per_class % 2:
      raise ValueError(f"modes_per_class must be even (pairs), got {self.modes_per_class}.")
    if not 0 < self.fork_frame < self.frames:
      raise ValueError(f"fork_frame must be in (0, {self.frames}), got {self.fork_frame}.")

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (self.frames, self.height, self.width, self.channels)

  @property
  def dim(self) -> int:
    return int(np.prod(self.shape))


class ToyWorld:
  """The modes, the class text embeddings and every closed form of one toy world."""

  def __init__(self, cfg: ToyConfig = ToyConfig()):
    self.cfg = cfg
    rng = np.random.default_rng(cfg.seed)
    K, M, F = cfg.num_classes, cfg.modes_per_class, cfg.frames
    modes = np.zeros((K, M) + cfg.shape)
    yy, xx = np.meshgrid(np.arange(cfg.height), np.arange(cfg.width), indexing="ij")
    for k in range(K):
      for pair in range(M // 2):
        size = np.array([cfg.height - 1, cfg.width - 1], np.float64)
        start = rng.uniform(0.25 * size, 0.75 * size)  # away from the borders
        shared_v = rng.uniform(-0.6, 0.6, 2)
        colour = rng.standard_normal(cfg.channels)
        for j in range(2):
          m = 2 * pair + j
          fork_v = rng.uniform(-0.9, 0.9, 2)
          for f in range(F):
            centre = start + shared_v * min(f, cfg.fork_frame) + fork_v * max(0, f - cfg.fork_frame)
            blob = np.exp(-((yy - centre[0])**2 + (xx - centre[1])**2) / (2 * cfg.blob_width**2))
            modes[k, m, f] = blob[..., None] * colour[None, None, :]
    # Unit second moment of the data: the modes carry 1 - sigma_d^2 of it.
    modes *= np.sqrt((1.0 - cfg.sigma_d**2) / np.mean(modes**2))
    self.modes = modes  # [K, M, F, H, W, C] float64
    self.text = rng.standard_normal((K, cfg.text_tokens, cfg.text_dim)).astype(np.float32)
    self.null_text = np.zeros((cfg.text_tokens, cfg.text_dim), np.float32)

  # Sampling.

  def sample(self, key: Array, cls: Array) -> tuple[Array, Array]:
    """Samples of classes cls [N]: (x [N, F, H, W, C] float32, mode index [N])."""
    k_m, k_z = jax.random.split(key)
    n = cls.shape[0]
    m = jax.random.randint(k_m, (n,), 0, self.cfg.modes_per_class)
    mu = jnp.asarray(self.modes, jnp.float32)[cls, m]
    return mu + self.cfg.sigma_d * jax.random.normal(k_z, mu.shape), m

  # Closed forms.

  def _class_modes(self, cls: Array | None) -> Array:
    """[N, M', D] float32: the modes of each sample's class, or of every class (cls None)."""
    flat = jnp.asarray(self.modes.reshape(self.cfg.num_classes, self.cfg.modes_per_class, -1),
                       jnp.float32)
    if cls is None:
      return flat.reshape(1, -1, flat.shape[-1])
    return flat[cls]

  def posterior_mean(self, x_t: Array, t: Array, cls: Array | None) -> Array:
    """E[x0 | x_t, class] ([N, F, H, W, C]); cls None gives the unconditional mean over all modes.

    t: [N] timesteps in (0, 1000].
    """
    n = x_t.shape[0]
    x = x_t.reshape(n, 1, -1).astype(jnp.float32)
    s = (jnp.asarray(t, jnp.float32) / 1000.0).reshape(n, 1, 1)
    mu = self._class_modes(cls)
    d2 = self.cfg.sigma_d**2
    v_s = (1 - s)**2 * d2 + s**2
    resid = x - (1 - s) * mu  # [N, M', D]
    logits = -jnp.sum(resid**2, axis=-1) / (2 * v_s[..., 0])  # equal weights: log pi cancels
    w = jax.nn.softmax(logits, axis=-1)[..., None]
    cond = mu + ((1 - s) * d2 / v_s) * resid
    return jnp.sum(w * cond, axis=1).reshape(x_t.shape)

  def velocity(self, x_t: Array, t: Array, cls: Array | None, guidance: float = 0.0) -> Array:
    """The flow velocity an exact model predicts; guidance g applies x0_c + g (x0_c - x0_u)."""
    x0 = self.posterior_mean(x_t, t, cls)
    if guidance:
      x0 = x0 + guidance * (x0 - self.posterior_mean(x_t, t, None))
    s = (jnp.asarray(t, jnp.float32) / 1000.0).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return (x_t - x0) / jnp.maximum(s, 1e-6)

  def log_density(self, x: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Exact log p(x | class) [N] in float64: log sum_m pi_m N(x; mu_m, sigma_d^2 I)."""
    x = np.asarray(x, np.float64).reshape(len(x), 1, -1)
    mu = self.modes.reshape(self.cfg.num_classes, self.cfg.modes_per_class, -1)[np.asarray(cls)]
    D, d2 = x.shape[-1], self.cfg.sigma_d**2
    log_n = -np.sum((x - mu)**2, axis=-1) / (2 * d2) - 0.5 * D * np.log(2 * np.pi * d2)
    return logsumexp(log_n, axis=1) - np.log(self.cfg.modes_per_class)

  def nearest_mode(self, x: np.ndarray, cls: np.ndarray, frames: slice = slice(None)) -> np.ndarray:
    """Index [N] of the class's mode nearest to x, compared on `frames` only."""
    x = np.asarray(x, np.float64)[:, frames].reshape(len(x), 1, -1)
    mu = self.modes[np.asarray(cls)][:, :, frames].reshape(len(x), self.cfg.modes_per_class, -1)
    return np.argmin(np.sum((x - mu)**2, axis=-1), axis=1)
