"""The toy world's closed forms against direct computation (TOY.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from asd_jax.toy.world import ToyConfig, ToyWorld


@pytest.fixture(scope="module")
def world():
  return ToyWorld(ToyConfig())


def test_modes_pair_up_and_the_data_has_unit_scale(world):
  cfg, mu = world.cfg, world.modes
  assert mu.shape == (4, 4) + cfg.shape
  for k in range(cfg.num_classes):
    for pair in range(cfg.modes_per_class // 2):
      a, b = mu[k, 2 * pair], mu[k, 2 * pair + 1]
      np.testing.assert_array_equal(a[:cfg.fork_frame + 1], b[:cfg.fork_frame + 1])
      assert np.abs(a[-1] - b[-1]).max() > 0.1  # they part ways after the fork
  assert np.mean(mu**2) + cfg.sigma_d**2 == pytest.approx(1.0)


def test_log_density_matches_a_direct_mixture_of_gaussians():
  world = ToyWorld(ToyConfig(frames=3, height=2, width=2, channels=2, fork_frame=1, sigma_d=0.3))
  x, _ = world.sample(jax.random.key(0), jnp.array([0, 1, 3]))
  x = np.asarray(x, np.float64)
  for i, c in enumerate([0, 1, 3]):
    direct = np.log(np.mean([multivariate_normal(world.modes[c, m].ravel(), 0.09).pdf(x[i].ravel())
                             for m in range(4)]))
    assert world.log_density(x[i:i + 1], np.array([c]))[0] == pytest.approx(direct, rel=1e-9)


def test_posterior_mean_limits_and_a_monte_carlo_check(world):
  x, m = world.sample(jax.random.key(1), jnp.zeros((3,), jnp.int32))
  # s -> 0: the posterior mean is the point itself.
  np.testing.assert_allclose(world.posterior_mean(x, jnp.full((3,), 1e-3), jnp.zeros(3, int)), x,
                             atol=1e-3)
  # s = 1: no information, the class average of the modes.
  noise = jax.random.normal(jax.random.key(2), x.shape)
  avg = world.modes[0].mean(axis=0)
  np.testing.assert_allclose(world.posterior_mean(noise, jnp.full((3,), 1000.0),
                                                  jnp.zeros(3, int))[0], avg, atol=1e-5)
  # A mid-noise point generated from mode m is attributed to it (the modes are far apart).
  s = 0.3
  x_t = (1 - s) * x + s * noise
  e = world.posterior_mean(x_t, jnp.full((3,), 300.0), jnp.zeros(3, int))
  d2 = world.cfg.sigma_d**2
  v_s = (1 - s)**2 * d2 + s**2
  mu = jnp.asarray(world.modes[0], jnp.float32)[m]
  np.testing.assert_allclose(e, mu + ((1 - s) * d2 / v_s) * (x_t - (1 - s) * mu), atol=1e-4)


def test_velocity_is_consistent_with_the_flow_convention(world):
  cls = jnp.array([1, 2])
  x, _ = world.sample(jax.random.key(3), cls)
  eps = jax.random.normal(jax.random.key(4), x.shape)
  t = jnp.array([625.0, 937.5])
  x_t = (1 - t[:, None, None, None, None] / 1000) * x + t[:, None, None, None, None] / 1000 * eps
  v = world.velocity(x_t, t, cls)
  x0 = x_t - (t / 1000)[:, None, None, None, None] * v
  np.testing.assert_allclose(x0, world.posterior_mean(x_t, t, cls), atol=1e-4)
  guided = world.velocity(x_t, t, cls, guidance=3.0)
  assert float(jnp.abs(guided - v).max()) > 0


def test_samples_lie_on_their_modes(world):
  cls = jnp.repeat(jnp.arange(4), 16)
  x, m = world.sample(jax.random.key(5), cls)
  np.testing.assert_array_equal(world.nearest_mode(np.asarray(x), np.asarray(cls)), np.asarray(m))
  # The first frames alone cannot tell a pair apart: the causal model must keep to one mode.
  early = world.nearest_mode(np.asarray(x), np.asarray(cls), slice(0, world.cfg.fork_frame))
  assert np.all(early // 2 == np.asarray(m) // 2)
  with pytest.raises(ValueError, match="even"):
    ToyConfig(modes_per_class=3)
