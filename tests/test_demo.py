"""`python -m asd_jax.demo`: the sampler's per-chunk stream, the demo's engine on tiny models, and
the page in a real (headless Chromium) browser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.models import wan
from asd_jax.sampling import generate

SCHEDULES = dict(first_chunk_timesteps=(1000.0, 750.0), later_chunk_timesteps=(1000.0,))


@pytest.fixture(scope="module")
def tiny_dit():
  cfg = wan.WanConfig.preset("tiny", in_channels=4, out_channels=4, text_dim=32, dtype="float32",
                                num_layers=1, scan_layers=False)
  return wan.WanModel(cfg), wan.init_params(cfg, jax.random.key(0))


def test_chunk_latents_stream_out_in_order_and_equal_the_output(tiny_dit):
  module, params = tiny_dit
  ctx = jax.random.normal(jax.random.key(1), (1, 4, 32))
  noise = jax.random.normal(jax.random.key(2), (1, 9, 4, 4, 4))
  seen = []
  fn = jax.jit(lambda p, c, z, r: generate(
      module, p, c, z, rng=r, on_chunk_latents=lambda i, x: seen.append((int(i), np.asarray(x))),
      **SCHEDULES))
  out = np.asarray(fn(params, ctx, noise, jax.random.key(3)))
  assert [i for i, _ in seen] == [0, 1, 2]
  for i, x in seen:
    np.testing.assert_array_equal(x, out[:, 3 * i:3 * i + 3])
  plain = jax.jit(lambda p, c, z, r: generate(module, p, c, z, rng=r, **SCHEDULES))
  np.testing.assert_array_equal(out, plain(params, ctx, noise, jax.random.key(3)))


def test_an_exception_in_the_chunk_callback_stops_the_generation(tiny_dit):
  module, params = tiny_dit
  seen = []

  def stop_after_first(i, _):
    seen.append(int(i))
    raise RuntimeError("stop")

  fn = jax.jit(lambda p, c, z, r: generate(module, p, c, z, rng=r,
                                           on_chunk_latents=stop_after_first, **SCHEDULES))
  with pytest.raises(Exception, match="stop"):
    jax.block_until_ready(fn(params, jnp.zeros((1, 4, 32)), jnp.ones((1, 9, 4, 4, 4)),
                             jax.random.key(0)))
  assert seen == [0]
