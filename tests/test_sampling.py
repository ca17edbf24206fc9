"""The causal chunk sampler: equal to a plain Python loop, compiled once, strict about its input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.diffusion import few_step_schedule
from asd_jax.models import wan
from asd_jax.sampling import chunk_key, generate

H, W, K = 4, 6, 3
SCHED = few_step_schedule(4)


class CountingWan(wan.WanModel):
  """WanModel that counts how often its cached forward is traced."""
  traces = [0]

  def forward_chunk(self, *args, **kwargs):
    CountingWan.traces[0] += 1
    return super().forward_chunk(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
  cfg = wan.WanConfig.preset("tiny")
  return wan.WanModel(cfg), wan.init_params(cfg, jax.random.key(0))


def _inputs(cfg, frames, batch=2):
  k1, k2 = jax.random.split(jax.random.key(5))
  return (jax.random.normal(k1, (batch, 7, cfg.text_dim)),
          jax.random.normal(k2, (batch, frames, H, W, cfg.in_channels)))


def reference(module, params, ctx, noise, first, later, rng, cache_frames=None, sink=0):
  """The procedure written as a plain loop, one forward call at a time."""
  B, F = noise.shape[:2]
  n = F // K
  p = {"params": params}
  cache = module.apply(p, ctx, height=H, width=W, capacity_frames=cache_frames or F,
                       sink_frames=sink, method="init_cache")
  step = jax.jit(lambda p, x, t, cache, off: module.apply(p, x, t, cache, off,
                                                          method="forward_chunk"))
  out = []
  for c in range(n):
    schedule = first if c == 0 else later
    x = noise[:, c * K:(c + 1) * K]
    for i, t in enumerate(schedule):
      v, cache = step(p, x, jnp.full((B,), t), cache, c * K)
      x0 = x - t / 1000.0 * v
      if i + 1 < len(schedule):
        s = schedule[i + 1] / 1000.0
        x = (1 - s) * x0 + s * jax.random.normal(chunk_key(rng, c, i), x.shape)
    out.append(x0)
    if c < n - 1:
      _, cache = step(p, x0, jnp.zeros((B,)), cache, c * K)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("later,frames,cache_frames,sink", [
    ((1000.0,), 9, None, 0),  # 1* with FFE
    pytest.param(SCHED[:2], 9, None, 0, marks=pytest.mark.slow),  # 2* prefix (suite budget)
    ((1000.0, SCHED[2]), 12, None, 0),  # 2* spread
    (SCHED[:2], 15, 9, 3),  # longer than the cache: rolling window with a sink chunk
])
def test_generate_equals_the_python_loop(tiny, later, frames, cache_frames, sink):
  module, params = tiny
  ctx, noise = _inputs(module.config, frames)
  rng = jax.random.key(11)
  gen = jax.jit(lambda p, c, z, r: generate(
      module, p, c, z, first_chunk_timesteps=SCHED, later_chunk_timesteps=later, rng=r,
      cache_frames=cache_frames, sink_frames=sink))
  out = gen(params, ctx, noise, rng)
  ref = reference(module, params, ctx, noise, SCHED, later, rng, cache_frames, sink)
  assert out.shape == noise.shape
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_one_chunk_and_progress_callback(tiny):
  module, params = tiny
  ctx, noise = _inputs(module.config, 9, batch=1)
  seen = []
  gen = jax.jit(lambda p, c, z: generate(
      module, p, c, z, first_chunk_timesteps=SCHED, later_chunk_timesteps=(1000.0,),
      rng=jax.random.key(1), on_chunk=lambda i: seen.append(int(i))))
  out = jax.block_until_ready(gen(params, ctx, noise))
  assert seen == [0, 1, 2]
  one = gen(params, ctx, noise[:, :3])
  np.testing.assert_allclose(one, out[:, :3], atol=1e-6)  # later chunks never touch chunk 0


def test_traced_once_whatever_the_number_of_chunks(tiny):
  _, params = tiny
  module = CountingWan(wan.WanConfig.preset("tiny"))
  counts = []
  for frames in (6, 9, 15):
    ctx, noise = _inputs(module.config, frames)
    CountingWan.traces[0] = 0
    jax.jit(lambda p, c, z: generate(module, p, c, z, first_chunk_timesteps=SCHED,
                                     later_chunk_timesteps=SCHED[:2],
                                     rng=jax.random.key(0))).lower(params, ctx, noise)
    counts.append(CountingWan.traces[0])
  # first chunk: 4 steps + refill; the scanned body: 2 steps + refill, traced once.
  assert counts == [8, 8, 8]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(first_chunk_timesteps=()), "empty"),
    (dict(later_chunk_timesteps=(1000.0, 1000.0)), "strictly decreasing"),
    (dict(later_chunk_timesteps=(0.0,)), r"\(0, 1000\]"),
    (dict(first_chunk_timesteps=(1500.0,)), r"\(0, 1000\]"),
    (dict(chunk_frames=4), "whole number"),
    (dict(cache_frames=3, sink_frames=3), "cannot hold"),
    (dict(sink_frames=2, cache_frames=9), "multiple"),
])
def test_bad_arguments_are_rejected_before_compiling(tiny, kwargs, msg):
  _, params = tiny
  module = CountingWan(wan.WanConfig.preset("tiny"))
  ctx, noise = _inputs(module.config, 9)
  args = dict(first_chunk_timesteps=SCHED, later_chunk_timesteps=(1000.0,), rng=jax.random.key(0))
  args.update(kwargs)
  CountingWan.traces[0] = 0
  with pytest.raises(ValueError, match=msg):
    generate(module, params, ctx, noise, **args)
  assert CountingWan.traces[0] == 0
