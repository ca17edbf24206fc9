"""Flow-matching maths, schedules and the teacher's Euler + CFG sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax import diffusion
from asd_jax.diffusion.euler import euler_sample


def test_warped_few_step_list():
  np.testing.assert_allclose(diffusion.warp_timesteps([1000, 750, 500, 250], shift=5.0),
                             [1000.0, 937.5, 833.3333333333334, 625.0], rtol=0, atol=1e-9)
  assert diffusion.few_step_schedule(4) == diffusion.warp_timesteps([1000, 750, 500, 250])
  assert diffusion.few_step_schedule(2, shift=1.0) == (1000.0, 500.0)
  grid = diffusion.shifted_timesteps(48, shift=5.0)
  assert grid[0] == 1000.0 and grid[-1] == 0.0 and len(grid) == 49
  for t in diffusion.few_step_schedule(4):  # the training timesteps lie on a 48-step grid
    assert np.min(np.abs(grid - t)) < 1e-9


def test_noise_and_conversions_round_trip():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (2, 6, 4, 4, 3))
  eps = jax.random.normal(k2, x0.shape)
  for t in (jnp.array([937.5, 20.0]), jax.random.uniform(k3, (2, 6), maxval=1000.0)):
    x_t = diffusion.add_noise(x0, eps, t)
    v = diffusion.v_target(x0, eps)
    np.testing.assert_allclose(diffusion.x0_from_v(x_t, v, t), x0, atol=2e-5)
    np.testing.assert_allclose(diffusion.eps_from_v(x_t, v, t), eps, atol=2e-5)
  np.testing.assert_allclose(diffusion.add_noise(x0, eps, jnp.full((2,), 1000.0)), eps)
  np.testing.assert_allclose(diffusion.add_noise(x0, eps, jnp.zeros((2,))), x0)
  with pytest.raises(ValueError, match=r"\[B\] or \[B, F\]"):
    diffusion.sigma(jnp.zeros((2, 3, 4)), x0)


def test_ffe_schedules_and_validation():
  ts = diffusion.few_step_schedule(4)
  assert diffusion.ffe_schedules(ts, 1) == (ts, (1000.0,))
  assert diffusion.ffe_schedules(ts, 2) == (ts, (1000.0, 937.5))
  assert diffusion.ffe_schedules(ts, 2, "spread") == (ts, (1000.0, ts[2]))
  assert diffusion.ffe_schedules(ts, 4, "spread")[1] == ts
  for bad, msg in (([], "empty"), ([1000, 1000], "strictly decreasing"), ([0.0], r"\(0, 1000\]"),
                   ([1200, 500], r"\(0, 1000\]"), (None, "list of timesteps")):
    with pytest.raises(ValueError, match=msg):
      diffusion.validate_timesteps(bad)
  with pytest.raises(ValueError, match="later_steps"):
    diffusion.ffe_schedules(ts, 5)
  with pytest.raises(ValueError, match="variant"):
    diffusion.ffe_schedules(ts, 2, "middle")


class _PointMass:
  """A stand-in network whose data distribution is one point mu(context) per sample.

  Its exact velocity is v = (x_t - mu) / s, and the ODE path x(s) = (1 - s) mu + s eps is a straight
  line, so Euler integration is exact for any number of steps.
  """

  def apply(self, variables, x, t, ctx):
    del variables
    mu = ctx[:, 0, 0].reshape(-1, 1, 1, 1, 1)
    return (x - mu) / (t / 1000.0).reshape(-1, 1, 1, 1, 1)


def test_euler_reaches_the_data_and_cfg_extrapolates():
  noise = jax.random.normal(jax.random.key(1), (2, 3, 2, 2, 4))
  ctx = jnp.broadcast_to(jnp.array([1.5, -2.0])[:, None, None], (2, 5, 8))
  neg = jnp.full((2, 5, 8), 0.5)
  grid = diffusion.shifted_timesteps(7)
  x = euler_sample(_PointMass(), None, noise, ctx, timesteps=grid)
  np.testing.assert_allclose(x, jnp.broadcast_to(ctx[:, 0, 0].reshape(2, 1, 1, 1, 1), x.shape),
                             atol=1e-5)
  x, traj = euler_sample(_PointMass(), None, noise, ctx, neg, timesteps=grid, guidance_scale=4.0,
                         return_trajectory=True)
  target = 0.5 + 4.0 * (ctx[:, 0, 0] - 0.5)
  np.testing.assert_allclose(x, jnp.broadcast_to(target.reshape(2, 1, 1, 1, 1), x.shape),
                             atol=1e-4)
  assert traj.shape == (8,) + noise.shape
  np.testing.assert_allclose(traj[0], noise)
  np.testing.assert_allclose(traj[-1], x)
  with pytest.raises(ValueError, match="strictly decreasing"):
    euler_sample(_PointMass(), None, noise, ctx, timesteps=[0.0, 1000.0])
