"""Faster inference paths give the numbers of the plain ones: per-layer (split) block params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.diffusion import few_step_schedule
from asd_jax.models import wan
from asd_jax.sampling import generate

H, W = 4, 6


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def tiny(request):
  cfg = wan.WanConfig.preset("tiny", num_layers=3, scan_layers=request.param)
  return wan.WanModel(cfg), wan.init_params(cfg, jax.random.key(0))


def _inputs(cfg, frames, batch=2):
  k1, k2 = jax.random.split(jax.random.key(5))
  return (jax.random.normal(k1, (batch, 7, cfg.text_dim)),
          jax.random.normal(k2, (batch, frames, H, W, cfg.in_channels)))


def test_split_layers_round_trip(tiny):
  _, params = tiny
  split = wan.split_layers(params)
  assert isinstance(split["blocks"], tuple) and len(split["blocks"]) == 3
  assert wan.split_layers(split) is split
  back = wan.stack_layers(split)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"taps": (0, 2)}],
                         ids=["bidirectional", "causal", "taps"])
def test_split_forward_equals_stacked(tiny, kwargs):
  module, params = tiny
  ctx, x = _inputs(module.config, 6)
  t = jnp.array([500.0, 250.0])
  fwd = jax.jit(lambda p: module.apply({"params": p}, x, t, ctx, **kwargs))
  a, b = fwd(params), fwd(wan.split_layers(params))
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)


def test_split_cached_chunk_equals_stacked(tiny):
  module, params = tiny
  ctx, x = _inputs(module.config, 6)
  t = jnp.array([500.0, 250.0])

  def run(p):
    cache = module.apply({"params": p}, ctx, height=H, width=W, capacity_frames=6,
                         method="init_cache")
    _, cache = module.apply({"params": p}, x[:, :3], t, cache, 0, method="forward_chunk")
    v, cache = module.apply({"params": p}, x[:, 3:], t, cache, 3, method="forward_chunk")
    return v, cache.k_LBSND, cache.v_LBSND, cache.cross_k_LBCND

  a, b = jax.jit(run)(params), jax.jit(run)(wan.split_layers(params))
  for u, v in zip(a, b):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)


def test_generate_with_split_params_equals_stacked(tiny):
  module, params = tiny
  ctx, noise = _inputs(module.config, 9)
  sched = few_step_schedule(4)
  gen = jax.jit(lambda p: generate(module, p, ctx, noise, first_chunk_timesteps=sched,
                                   later_chunk_timesteps=sched[:2], chunk_frames=3,
                                   rng=jax.random.key(2)))
  np.testing.assert_allclose(gen(wan.split_layers(params)), gen(params), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(4, 4), (8, 5), (12, 12), (3, 12), (20, 13), (24, 24)])
def test_cached_attention_prefix_equals_masked_whole_cache(lengths):
  from asd_jax.models.attention import attention
  from asd_jax.models.attention import cached_attention
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (2, 4, 2, 8))
  k = jax.random.normal(kk, (2, 24, 2, 8))
  v = jax.random.normal(kv, (2, 24, 2, 8))
  lengths = jnp.asarray(lengths, jnp.int32)
  want = attention(q, k, v, kv_lengths=lengths, impl="xla")
  got = jax.jit(lambda q, k, v, n: cached_attention(q, k, v, n, granule=8, impl="xla"))(
      q, k, v, lengths)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
