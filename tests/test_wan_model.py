"""The Wan DiT on its own: causal consistency, KV cache, rolling window, taps, shapes, precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.models import wan

B, H, W = 2, 4, 6  # H != W on purpose
CHUNK = 3


@pytest.fixture(scope="module")
def tiny():
  cfg = wan.WanConfig.preset("tiny", chunk_frames=CHUNK)
  return cfg, wan.WanModel(cfg), wan.init_params(cfg, jax.random.key(1))


def _inputs(cfg, frames, seed=2):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (B, frames, H, W, cfg.in_channels))
  ctx = jax.random.normal(k2, (B, 7, cfg.text_dim))
  t = jax.random.uniform(k3, (B, frames), minval=0.0, maxval=1000.0)  # differs per frame
  return x, t, ctx


def _chunked(module, params, x, t, ctx, capacity, sink=0):
  """Chunk-by-chunk cached forward with one jitted step (frame offset traced)."""
  step = jax.jit(lambda p, xc, tc, cache, off: module.apply(
      {"params": p}, xc, tc, cache, off, method="forward_chunk"))
  cache = module.apply({"params": params}, ctx, height=H, width=W, capacity_frames=capacity,
                       sink_frames=sink, method="init_cache")
  outs = []
  for start in range(0, x.shape[1], CHUNK):
    v, cache = step(params, x[:, start:start + CHUNK], t[:, start:start + CHUNK], cache, start)
    outs.append(v)
  return jnp.concatenate(outs, axis=1), step


def test_block_causal_equals_cached_chunks(tiny):
  cfg, module, params = tiny
  x, t, ctx = _inputs(cfg, 9)
  full = module.apply({"params": params}, x, t, ctx, causal=True)
  chunked, step = _chunked(module, params, x, t, ctx, capacity=9)
  # fp32 on CPU, same code both ways except the attention pattern: agreement to float rounding.
  np.testing.assert_allclose(chunked, full, atol=1e-5, rtol=1e-5)
  assert step._cache_size() == 1, "forward_chunk recompiled for a new frame offset"
  # The mask matters: later chunks must differ from the bidirectional forward.
  bi = module.apply({"params": params}, x, t, ctx)
  assert float(jnp.abs(bi[:, 3:] - full[:, 3:]).max()) > 1e-2


def test_first_chunk_equals_bidirectional_on_it_alone(tiny):
  cfg, module, params = tiny
  x, t, ctx = _inputs(cfg, 9)
  full = module.apply({"params": params}, x, t, ctx, causal=True)
  alone = module.apply({"params": params}, x[:, :CHUNK], t[:, :CHUNK], ctx)
  np.testing.assert_allclose(full[:, :CHUNK], alone, atol=1e-5, rtol=1e-5)


def test_repeated_calls_overwrite_the_chunk(tiny):
  """Denoising steps then the t=0 refill: only the last write of a chunk stays in the cache."""
  cfg, module, params = tiny
  x, t, ctx = _inputs(cfg, 6)
  apply = lambda *a: module.apply({"params": params}, *a, method="forward_chunk")
  init = lambda: module.apply({"params": params}, ctx, height=H, width=W, capacity_frames=6,
                              method="init_cache")
  zeros = jnp.zeros((B,))
  noisy = jax.random.normal(jax.random.key(9), x[:, :CHUNK].shape)
  cache = init()
  _, cache = apply(noisy, jnp.full((B,), 937.5), cache, 0)
  _, cache = apply(noisy * 0.5, jnp.full((B,), 625.0), cache, 0)
  _, cache = apply(x[:, :CHUNK], zeros, cache, 0)  # refill
  v_after_steps, _ = apply(x[:, CHUNK:], t[:, CHUNK:], cache, CHUNK)
  _, clean_cache = apply(x[:, :CHUNK], zeros, init(), 0)
  v_clean, _ = apply(x[:, CHUNK:], t[:, CHUNK:], clean_cache, CHUNK)
  np.testing.assert_allclose(v_after_steps, v_clean, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("capacity,sink", [(9, 3), (6, 0)])
def test_rolling_window_with_sink_frames(tiny, capacity, sink):
  """A video longer than the cache: each chunk sees the sink chunks plus the newest window."""
  cfg, module, params = tiny
  frames = 15
  x, t, ctx = _inputs(cfg, frames, seed=3)
  chunked, _ = _chunked(module, params, x, t, ctx, capacity=capacity, sink=sink)
  n = frames // CHUNK
  sink_chunks, ring_chunks = sink // CHUNK, (capacity - sink) // CHUNK
  q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  visible = (k <= q) & ((k < sink_chunks) | (k > q - ring_chunks))
  frame_mask = jnp.asarray(np.repeat(np.repeat(visible, CHUNK, 0), CHUNK, 1))
  ref = module.apply({"params": params}, x, t, ctx, frame_mask=frame_mask)
  np.testing.assert_allclose(chunked, ref, atol=1e-5, rtol=1e-5)
  # Past the capacity the window really dropped frames: the full causal forward differs there.
  causal = module.apply({"params": params}, x, t, ctx, causal=True)
  late = slice(capacity + CHUNK, frames)
  assert float(jnp.abs(causal[:, late] - chunked[:, late]).max()) > 1e-3


def test_taps_are_hidden_states_after_those_blocks(tiny):
  cfg, module, params = tiny
  x, t, ctx = _inputs(cfg, 3)
  v, hidden = module.apply({"params": params}, x, t, ctx, taps=(0,))
  assert hidden.shape == (1, B, 3 * (H // 2) * (W // 2), cfg.dim)
  np.testing.assert_array_equal(v, module.apply({"params": params}, x, t, ctx))
  # The state after block 0 is what a one-block model hands to its head: compare through the taps
  # of a truncated copy of the same weights.
  one = cfg.replace(num_layers=1)
  p1 = dict(params, blocks=jax.tree_util.tree_map(lambda a: a[:1], params["blocks"]))
  _, hidden1 = wan.WanModel(one).apply({"params": p1}, x, t, ctx, taps=(0,))
  np.testing.assert_allclose(hidden, hidden1, atol=1e-6)
  with pytest.raises(ValueError, match="tap index"):
    module.apply({"params": params}, x, t, ctx, taps=(cfg.num_layers,))


@pytest.mark.slow  # suite budget (the default suite stays under 10 minutes on 2 cores)
def test_unrolled_and_remat_match_scan(tiny):
  cfg, module, params = tiny
  x, t, ctx = _inputs(cfg, 6)
  ref = module.apply({"params": params}, x, t, ctx, causal=True)
  for variant in (cfg.replace(scan_layers=False), cfg.replace(remat_policy="full"),
                  cfg.replace(remat_policy="dots", scan_layers=False)):
    out = wan.WanModel(variant).apply({"params": params}, x, t, ctx, causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-6)

  def loss(p, c):
    return jnp.mean(wan.WanModel(c).apply({"params": p}, x, t, ctx, causal=True)**2)

  g_ref = jax.grad(loss)(params, cfg)
  g_remat = jax.grad(loss)(params, cfg.replace(remat_policy="full"))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                         g_remat, g_ref)
  assert float(jnp.abs(g_ref["blocks"]["self_attn"]["q"]["kernel"]).max()) > 0


def test_bfloat16_compute_stays_close_to_float32(tiny):
  cfg, _, params = tiny
  x, t, ctx = _inputs(cfg, 6)
  ref = wan.WanModel(cfg).apply({"params": params}, x, t, ctx)
  out = wan.WanModel(cfg.replace(dtype="bfloat16")).apply({"params": params}, x, t, ctx)
  assert out.dtype == jnp.float32  # the head and residual stream stay float32
  err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert 0 < err < 3e-2, err


@pytest.mark.parametrize("preset,count", [("1.3b", 1_418_996_800), ("14b", 14_288_491_584)])
def test_presets_have_the_real_parameter_counts(preset, count):
  cfg = wan.WanConfig.preset(preset)
  shapes = wan.abstract_params(cfg)  # abstract: nothing allocated
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes)) == count
  axes = wan.logical_axes(cfg)
  for leaf, spec in zip(jax.tree_util.tree_leaves(shapes),
                        jax.tree_util.tree_leaves(axes, is_leaf=lambda s: isinstance(
                            s, jax.sharding.PartitionSpec))):
    assert len(spec) == leaf.ndim


def test_bad_inputs_get_clear_errors(tiny):
  cfg, module, params = tiny
  x, t, ctx = _inputs(cfg, 6)
  p = {"params": params}
  with pytest.raises(ValueError, match="in_channels"):
    module.apply(p, x[..., :3], t, ctx)
  with pytest.raises(ValueError, match="divisible by the patch"):
    module.apply(p, x[:, :, :3], t[:, :6], ctx)
  with pytest.raises(ValueError, match="text_dim"):
    module.apply(p, x, t, ctx[..., :5])
  with pytest.raises(ValueError, match="per-frame timesteps"):
    module.apply(p, x, t[:, :4], ctx)
  cache = module.apply(p, ctx, height=H, width=W, capacity_frames=6, sink_frames=3,
                       method="init_cache")
  with pytest.raises(ValueError, match="does not fit"):
    module.apply(p, x[:, :6], t, cache, 0, method="forward_chunk")
  with pytest.raises(ValueError, match="not divisible"):
    wan.WanConfig(dim=50, num_heads=3)
  with pytest.raises(ValueError, match="Unknown Wan preset"):
    wan.WanConfig.preset("7b")
  with pytest.raises(ValueError, match="remat_policy"):
    wan.WanConfig.preset("tiny", remat_policy="some")


def test_rope_time_positions_past_the_table_extend_the_formula():
  cfg = wan.WanConfig.preset("tiny", rope_max_len=8)
  from asd_jax.models.wan_layers import rope_cos_sin
  cos_in, sin_in = rope_cos_sin(cfg, 3, 2, 2, frame_offset=4)  # frames 4..6: in the table
  cos_out, sin_out = rope_cos_sin(cfg, 3, 2, 2, frame_offset=jnp.int32(10))  # 10..12: past it
  wide = wan.WanConfig.preset("tiny", rope_max_len=64)
  np.testing.assert_allclose(cos_in, rope_cos_sin(wide, 3, 2, 2, 4)[0], atol=0)
  np.testing.assert_allclose(cos_out, rope_cos_sin(wide, 3, 2, 2, 10)[0], atol=2e-6)
  np.testing.assert_allclose(sin_out, rope_cos_sin(wide, 3, 2, 2, 10)[1], atol=2e-6)
  assert float(jnp.abs(cos_out - rope_cos_sin(cfg, 3, 2, 2, 5)[0]).max()) > 1e-2  # not clamped
  with pytest.raises(ValueError, match="rope_max_len"):
    rope_cos_sin(cfg, 1, 9, 2)
