"""TPU splash attention (Pallas, interpret mode on CPU) against the XLA reference path.

Reference: `jax.nn.dot_product_attention(implementation="xla")`, which materialises every score
(`asd_jax.models.attention`, impl "xla"); float32 throughout, shapes that span several kernel
blocks and end in a padded tail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.models import attention as attn
from asd_jax.models import splash
from asd_jax.models import wan

TOL = dict(atol=2e-5, rtol=2e-5)


def _qkv(b, t, s, n=2, d=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, d)), jax.random.normal(ks[1], (b, s, n, d)),
          jax.random.normal(ks[2], (b, s, n, d)))


def test_block_choice_pads_least():
  assert splash.pick_block(32760) == 512  # -> 32,768
  assert splash.pick_block(4680) == 128  # -> 4,736 (512 would pad to 5,120)
  assert splash.pick_block(512) == 512
  assert splash.pick_block(300) == 128  # -> 384


def test_bidirectional_and_cross_attention_equal_xla():
  # 300 tokens: three 128-blocks, the last one padded (84 padded keys and queries).
  q, k, v = _qkv(2, 300, 300)
  np.testing.assert_allclose(attn.attention(q, k, v, impl="splash"),
                             attn.attention(q, k, v, impl="xla"), **TOL)
  # Cross-attention: 300 queries against 512 text keys (one 512-block, no key padding).
  q, k, v = _qkv(1, 300, 512, seed=1)
  np.testing.assert_allclose(attn.attention(q, k, v, impl="splash"),
                             attn.attention(q, k, v, impl="xla"), **TOL)


def test_block_causal_equals_dense_mask_with_its_gradients():
  q, k, v = _qkv(1, 300, 300)
  # 90-token chunks: boundaries inside kernel blocks, a partial last chunk (300 = 3 * 90 + 30).
  fn = lambda impl: lambda *a: attn.block_causal_attention(*a, chunk_tokens=90, impl=impl)
  ref = fn("xla")(q, k, v)
  np.testing.assert_allclose(fn("splash")(q, k, v), ref, **TOL)
  np.testing.assert_allclose(
      attn.block_causal_attention(q, k, v, chunk_tokens=90, impl="xla", method="prefix"), ref,
      **TOL)
  loss = lambda impl: lambda *a: jnp.sum(jnp.sin(fn(impl)(*a)))
  g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  g_splash = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_splash, g_ref):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_block_causal_mask_is_block_sparse():
  """Key blocks wholly after a query block's chunk are skipped: never loaded, never computed."""
  T, chunk, block = 4 * 256, 256, 128
  mask = splash.PrefixChunkMask((T, T), T, chunk)
  kernel = splash._kernel(1, T, T, T, chunk, block, block, True)
  block_mask = np.asarray(kernel.fwd_mask_info.block_mask)[0]  # [q blocks, kv blocks]: 0/1/2
  q_chunk = np.arange(T // block) * block // chunk
  expected = np.where(q_chunk[None, :] <= q_chunk[:, None], 2, 0)  # chunks align with blocks
  np.testing.assert_array_equal(block_mask, expected)
  assert (block_mask == 0).mean() == pytest.approx(6 / 16)  # (n - 1) / 2n of the blocks skipped
  # Padded keys are outside the static mask: a 300-token sequence leaves its tail block partial.
  tail = splash.PrefixChunkMask((384, 384), 300)[slice(0, 128), slice(256, 384)]
  assert tail[:, :44].all() and not tail[:, 44:].any()
  assert mask[slice(0, 4), slice(0, 4)].all()


def test_cached_chunk_with_valid_lengths_equals_xla():
  # One chunk's queries against a cache of 400 slots, filled to a different length per row.
  q, k, v = _qkv(2, 90, 400)
  lengths = jnp.array([180, 400], jnp.int32)
  ref = attn.attention(q, k, v, kv_lengths=lengths, impl="xla")
  np.testing.assert_allclose(attn.attention(q, k, v, kv_lengths=lengths, impl="splash"), ref,
                             **TOL)
  # Traced lengths (the sampler's frame offset is traced inside its scan): one compile.
  f = jax.jit(lambda l: attn.attention(q, k, v, kv_lengths=l, impl="splash"))
  np.testing.assert_allclose(f(lengths), ref, **TOL)
  np.testing.assert_allclose(f(jnp.array([90, 270], jnp.int32)),
                             attn.attention(q, k, v, kv_lengths=jnp.array([90, 270]), impl="xla"),
                             **TOL)


def test_cache_blocks_past_the_longest_row_are_skipped():
  """NaN keys and values in the blocks past the longest row never reach the output: those blocks
  are neither loaded nor computed (masking alone would give 0 * NaN = NaN)."""
  q, k, v = _qkv(2, 90, 600)  # 600 keys: five 128-blocks (640)
  lengths = jnp.array([100, 200], jnp.int32)  # live blocks: 0 and 1
  ref = attn.attention(q, k, v, kv_lengths=lengths, impl="xla")
  k_nan = k.at[:, 256:].set(jnp.nan)
  v_nan = v.at[:, 256:].set(jnp.nan)
  out = jax.jit(lambda l: attn.attention(q, k_nan, v_nan, kv_lengths=l, impl="splash"))(lengths)
  np.testing.assert_allclose(out, ref, **TOL)
  kernel = splash._kernel(2, 128, 640, 600, 0, 128, 128, True)
  limited = splash.limit_kv_blocks(kernel, jnp.int32(200), 128)
  np.testing.assert_array_equal(np.asarray(limited.fwd_mask_info.block_mask)[0],
                                [[2, 2, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(limited.fwd_mask_info.data_next)[0],
                                [[0, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def tiny():
  # 12 x 12 latents -> 36 tokens a frame; 6 frames -> 216 tokens (two 128-blocks, padded tail).
  cfg = wan.WanConfig.preset("tiny", chunk_frames=3)
  return cfg, wan.init_params(cfg, jax.random.key(1))


def _model_inputs(cfg, frames=6, b=1, seed=2):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (b, frames, 12, 12, cfg.in_channels))
  ctx = jax.random.normal(k2, (b, 7, cfg.text_dim))
  t = jax.random.uniform(k3, (b,), minval=0.0, maxval=1000.0)
  return x, t, ctx


@pytest.mark.parametrize("causal,frames", [(False, 6), (True, 7)])  # 7: a partial last chunk
def test_dit_forward_with_splash_equals_xla(tiny, causal, frames):
  cfg, params = tiny
  x, t, ctx = _model_inputs(cfg, frames)
  out = {impl: wan.WanModel(cfg.replace(attention_impl=impl)).apply(
      {"params": params}, x, t, ctx, causal=causal) for impl in ("xla", "splash")}
  np.testing.assert_allclose(out["splash"], out["xla"], **TOL)


def test_dit_cached_chunks_with_splash_equal_xla_with_a_rolling_window(tiny):
  """Chunks through the KV cache; 9 frames in a 6-frame cache with 3 sink frames (the ring)."""
  cfg, params = tiny
  x, t, ctx = _model_inputs(cfg, frames=9)
  outs = {}
  for impl in ("xla", "splash"):
    module = wan.WanModel(cfg.replace(attention_impl=impl))
    step = jax.jit(lambda p, xc, cache, off, m=module: m.apply(
        {"params": p}, xc, t, cache, off, method="forward_chunk"))
    cache = module.apply({"params": params}, ctx, height=12, width=12, capacity_frames=6,
                         sink_frames=3, method="init_cache")
    chunks = []
    for start in range(0, 9, 3):
      v, cache = step(params, x[:, start:start + 3], cache, start)
      chunks.append(v)
    outs[impl] = jnp.concatenate(chunks, axis=1)
  np.testing.assert_allclose(outs["splash"], outs["xla"], **TOL)
