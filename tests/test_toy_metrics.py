"""The toy metrics on cases whose answer is known: true samples, collapsed and drifting samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.toy import metrics
from asd_jax.toy.world import ToyConfig, ToyWorld


@pytest.fixture(scope="module")
def world():
  return ToyWorld(ToyConfig())


def _true(world, cls, n, seed):
  x, m = world.sample(jax.random.key(seed), jnp.full((n,), cls))
  return np.asarray(x), np.asarray(m)


def test_true_samples_score_perfectly(world):
  x, _ = _true(world, 1, 256, 0)
  ref, _ = _true(world, 1, 256, 1)
  m = metrics.class_metrics(world, x, 1, ref)
  assert m["precision"] >= 0.99 and m["coverage"] == 1.0 and m["temporal_consistency"] == 1.0
  # The NLL per dimension of true samples is the Gaussian's entropy per dimension.
  entropy = 0.5 * np.log(2 * np.pi * np.e * world.cfg.sigma_d**2)
  assert m["nll_per_dim"] == pytest.approx(entropy, abs=0.02)
  # Two true sample sets differ only by sampling noise (mostly the mode proportions): tiny next
  # to a collapsed sampler's distance.
  collapsed = np.stack([world.modes[1, 0]] * 64)
  assert abs(m["energy_distance"]) < 0.05 * metrics.energy_distance(collapsed, ref)


def test_collapse_drift_and_blur_are_caught(world):
  ref, _ = _true(world, 2, 256, 1)
  x, m = _true(world, 2, 256, 2)
  collapsed = x[m == 0]
  assert metrics.class_metrics(world, collapsed, 2, ref)["coverage"] == 0.25
  # Drift: first chunk from mode 0, the rest from mode 2 (a different pair).
  drift = world.modes[2, 0].copy()
  drift[3:] = world.modes[2, 2, 3:]
  d = metrics.class_metrics(world, np.stack([drift] * 8), 2, ref)
  assert d["temporal_consistency"] == 0.0 and d["precision"] == 0.0
  # Blur: the class average of the modes is on no mode and far less likely.
  blur = np.stack([world.modes[2].mean(axis=0)] * 8)
  b = metrics.class_metrics(world, blur, 2, ref)
  assert b["precision"] == 0.0 and b["nll_per_dim"] > 1.0
  assert b["energy_distance"] > metrics.class_metrics(world, x[:64], 2, ref)["energy_distance"]


def test_energy_distance_and_step_similarity_by_hand():
  a = np.array([[0.0], [2.0]])
  b = np.array([[1.0], [1.0]])
  # 2 * mean|a - b| - mean over distinct pairs |a - a'| - |b - b'| = 2 * 1 - 2 - 0
  assert metrics.energy_distance(a, b) == pytest.approx(0.0)
  assert metrics.energy_distance(a, a + 10.0) == pytest.approx(2 * 10.0 - 2 * 2.0)
  steps = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
  sim = metrics.step_similarity(steps)
  np.testing.assert_allclose(sim, [[1, 0, 2**-0.5], [0, 1, 2**-0.5], [2**-0.5, 2**-0.5, 1]],
                             atol=1e-12)
  assert metrics.average([{"a": 1.0}, {"a": 3.0}]) == {"a": 2.0}
