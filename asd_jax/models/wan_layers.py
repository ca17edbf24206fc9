"""Layers and numerics of the Wan 2.1 DiT (see `asd_jax.models.wan` for the model and its calls)."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.models.attention import attention, block_causal_attention, cached_attention
from asd_jax.models.wan_config import WanConfig

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Numerics shared by the layers.


def _layer_norm(x: Array, eps: float) -> Array:
  """LayerNorm without affine params, in float32 (two-pass variance, as torch)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return xc * jax.lax.rsqrt(var + eps)


def sinusoidal_embedding(t: Array, dim: int) -> Array:
  """[...] float timesteps in [0, 1000] -> [..., dim] as concat(cos, sin), float32."""
  half = dim // 2
  freqs = jnp.asarray(np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half),
                      jnp.float32)
  arg = t.astype(jnp.float32)[..., None] * _lead(freqs, t.ndim + 1)
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Real channels given to (time, height, width): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def _rope_inv_freqs(head_dim: int, theta: float) -> tuple[np.ndarray, ...]:
  """Per-axis inverse frequencies theta^(-2j/axis_dim), float64."""
  return tuple(1.0 / theta**(np.arange(0, d, 2, dtype=np.float64) / d)
               for d in rope_axis_dims(head_dim))


@functools.lru_cache(maxsize=16)
def _rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[np.ndarray, ...]:
  """cos and sin tables per axis, each [max_len, axis_dim // 2], from float64 angles as upstream."""
  angles = [np.outer(np.arange(max_len, dtype=np.float64), inv)
            for inv in _rope_inv_freqs(head_dim, theta)]
  return tuple(np.cos(a).astype(np.float32) for a in angles) + tuple(
      np.sin(a).astype(np.float32) for a in angles)


def rope_cos_sin(cfg: WanConfig, frames: int, height: int, width: int,
                 frame_offset: Array | int = 0) -> tuple[Array, Array]:
  """cos, sin of the 3D RoPE angles, each [frames * height * width, head_dim // 2] float32.

  Token order is (f, h, w) row-major; the time position is `frame_offset + f` (may be traced).
  Positions below `rope_max_len` read the float64-built table of the reference; time positions past
  it (rolling generation beyond 1024 latent frames, where the reference has no table) use the same
  formula in float32 rather than being clamped.
  """
  max_len = cfg.rope_max_len
  if height > max_len or width > max_len:
    raise ValueError(f"a {height}x{width} token grid exceeds rope_max_len={max_len}.")
  tables = _rope_tables(cfg.head_dim, max_len, cfg.rope_theta)
  inv_t = jnp.asarray(_rope_inv_freqs(cfg.head_dim, cfg.rope_theta)[0], jnp.float32)
  f_pos = frame_offset + jnp.arange(frames)
  inside = (f_pos < max_len)[:, None]
  angle_t = f_pos.astype(jnp.float32)[:, None] * inv_t[None, :]
  out = []
  for (t_tab, h_tab, w_tab), fn in ((tables[:3], jnp.cos), (tables[3:], jnp.sin)):
    t_val = jnp.where(inside, jnp.asarray(t_tab)[jnp.minimum(f_pos, max_len - 1)], fn(angle_t))
    k_t, k_h, k_w = t_tab.shape[1], h_tab.shape[1], w_tab.shape[1]
    parts = [
        jnp.broadcast_to(t_val[:, None, None], (frames, height, width, k_t)),
        jnp.broadcast_to(jnp.asarray(h_tab[:height])[None, :, None], (frames, height, width, k_h)),
        jnp.broadcast_to(jnp.asarray(w_tab[:width])[None, None, :], (frames, height, width, k_w)),
    ]
    out.append(jnp.concatenate(parts, axis=-1).reshape(frames * height * width, -1))
  return out[0], out[1]


def apply_rope(x_BTND: Array, cos_TK: Array, sin_TK: Array) -> Array:
  """Rotates interleaved channel pairs (x[2i], x[2i+1]) as complex numbers; float32 math."""
  dtype = x_BTND.dtype
  x = x_BTND.astype(jnp.float32).reshape(*x_BTND.shape[:-1], -1, 2)
  x1, x2 = x[..., 0], x[..., 1]
  c, s = cos_TK[None, :, None, :], sin_TK[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(x_BTND.shape).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Layers.


def _lead(v: Array, ndim: int) -> Array:
  """Reshapes a vector to broadcast along the last axis of an ndim array (no rank promotion)."""
  return v.reshape((1,) * (ndim - 1) + v.shape[-1:])


def _init(axes: tuple[str | None, ...], base=nn.initializers.xavier_uniform()):
  return nn.with_logical_partitioning(base, axes)


class Dense(nn.Module):
  """Linear layer with logical axis names; kernel [in, out] (a torch weight transposed)."""
  features: int
  axes: tuple[str | None, str | None]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _init(self.axes), (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", _init((self.axes[1],), nn.initializers.zeros), (self.features,),
                      self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
    return y + _lead(bias.astype(self.dtype), y.ndim)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale, computed in float32."""
  eps: float
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", _init((self.axis_name,), nn.initializers.ones), (x.shape[-1],),
                       jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * _lead(scale.astype(jnp.float32), y.ndim)).astype(x.dtype)


class AffineLayerNorm(nn.Module):
  """LayerNorm with scale and bias, float32 (`norm3` of the original block)."""
  eps: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", _init(("embed",), nn.initializers.ones), (d,), jnp.float32)
    bias = self.param("bias", _init(("embed",), nn.initializers.zeros), (d,), jnp.float32)
    return _layer_norm(x, self.eps) * _lead(scale, x.ndim) + _lead(bias, x.ndim)


class Attention(nn.Module):
  """q, k, v, o projections with RMSNorm on q and k over the full width (before the head split)."""
  cfg: WanConfig

  def setup(self):
    cfg = self.cfg
    dense = functools.partial(Dense, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision)
    self.q = dense(cfg.dim, ("embed", "qkv"))
    self.k = dense(cfg.dim, ("embed", "qkv"))
    self.v = dense(cfg.dim, ("embed", "qkv"))
    self.o = dense(cfg.dim, ("qkv", "embed"))
    if cfg.qk_norm:
      self.norm_q = RMSNorm(cfg.eps, "qkv")
      self.norm_k = RMSNorm(cfg.eps, "qkv")

  def _heads(self, x: Array) -> Array:
    return x.reshape(*x.shape[:-1], self.cfg.num_heads, self.cfg.head_dim)

  def query(self, x: Array) -> Array:
    q = self.q(x)
    return self._heads(self.norm_q(q) if self.cfg.qk_norm else q)

  def key_value(self, src: Array) -> tuple[Array, Array]:
    k = self.k(src)
    k = self.norm_k(k) if self.cfg.qk_norm else k
    return self._heads(k), self._heads(self.v(src))

  def out(self, a_BTND: Array) -> Array:
    return self.o(a_BTND.reshape(*a_BTND.shape[:-2], -1))

  def __call__(self, x: Array, src: Array) -> Array:  # used by init only
    k, v = self.key_value(src)
    return self.out(attention(self.query(x), k, v, impl="xla"))


class Block(nn.Module):
  """One transformer block, written for `nn.scan` over the stacked layers.

  mode: "full" (whole sequence; optional boolean mask), "chunk" (one causal chunk against the KV
  cache slices of this layer, which it updates), "context" (only the cross-attention K/V of the text).
  carry = (x [B, F, S, dim] float32, taps buffer or None); xs = per-layer slices (layer index and,
  in chunk mode, the cache). Returns (carry, per-layer outputs).
  """
  cfg: WanConfig
  mode: str = "full"
  taps: tuple[int, ...] = ()
  sink_frames: int = 0
  chunk_tokens: int = 0  # > 0: block-causal self-attention over chunks of this many tokens

  @nn.compact
  def __call__(self, carry, e0, rope, ctx, attn_args, xs):
    cfg = self.cfg
    cdt = jnp.dtype(cfg.dtype)
    self_attn = Attention(cfg, name="self_attn")
    cross_attn = Attention(cfg, name="cross_attn")

    if self.mode == "context":
      k, v = cross_attn.key_value(ctx)
      return carry, {"cross_k": k.astype(cdt), "cross_v": v.astype(cdt)}

    x, taps_buf = carry
    B, F, S, D = x.shape
    modulation = self.param("modulation",
                            _init((None, "embed"), nn.initializers.normal(D**-0.5)), (6, D),
                            jnp.float32)
    e = modulation[None, None] + e0  # [B, F, 6, D] float32
    shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (
        e[:, :, i, None, :] for i in range(6))

    # Self-attention.
    h = (_layer_norm(x, cfg.eps) * (1 + scale_msa) + shift_msa).astype(cdt).reshape(B, F * S, D)
    cos, sin = rope
    q = apply_rope(self_attn.query(h), cos, sin)
    k, v = self_attn.key_value(h)
    k = apply_rope(k, cos, sin)
    new_cache = None
    if self.mode == "chunk":
      k_new, v_new = k.astype(xs["k"].dtype), v.astype(xs["v"].dtype)
      # This layer's cache with the chunk in its slots: a per-layer transient. The layer outputs
      # only the chunk's K/V; the caller writes them into the whole (donated) cache in place, so
      # the scan never builds a second cache.
      k_cache, v_cache = write_chunk(xs["k"], xs["v"], k_new, v_new, attn_args["frame_offset"],
                                      F, S, self.sink_frames)
      new_cache = {"k": k_new, "v": v_new}
      a = cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                           attn_args["kv_lengths"], granule=F * S, impl=cfg.attention_impl)
    elif self.chunk_tokens:
      a = block_causal_attention(q, k, v, chunk_tokens=self.chunk_tokens,
                                 impl=cfg.attention_impl)
    else:
      a = attention(q, k, v, mask=attn_args.get("mask"), impl=cfg.attention_impl)
    y = self_attn.out(a).reshape(B, F, S, D)
    x = x + y.astype(jnp.float32) * gate_msa

    # Cross-attention to the text (no mask over the 512 positions, as the original).
    h = AffineLayerNorm(cfg.eps, name="norm3")(x) if cfg.cross_attn_norm else x
    h = h.astype(cdt).reshape(B, F * S, D)
    if self.mode == "chunk":
      ck, cv = xs["cross_k"].astype(cdt), xs["cross_v"].astype(cdt)
    else:
      ck, cv = cross_attn.key_value(ctx)
    y = cross_attn.out(attention(cross_attn.query(h), ck, cv, impl=cfg.attention_impl))
    x = x + y.astype(jnp.float32).reshape(B, F, S, D)

    # Feed-forward.
    h = (_layer_norm(x, cfg.eps) * (1 + scale_ffn) + shift_ffn).astype(cdt)
    y = MLP(cfg, cfg.ffn_dim, (("embed", "mlp"), ("mlp", "embed")), "gelu", cdt, name="ffn")(h)
    x = x + y.astype(jnp.float32) * gate_ffn

    if self.taps:
      taps_buf = _record_tap(taps_buf, x, xs["index"], self.taps, cfg.num_layers)
    return (x, taps_buf), new_cache


class MLP(nn.Module):
  """fc1 -> activation -> fc2 (the text/time embeddings and the block FFN)."""
  cfg: WanConfig
  hidden: int
  axes: tuple[tuple, tuple]  # logical axes of fc1 and fc2 kernels
  act: str  # gelu (tanh approximation) | silu
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                              precision=cfg.precision)
    h = dense(self.hidden, self.axes[0], name="fc1")(x)
    h = jax.nn.gelu(h, approximate=True) if self.act == "gelu" else nn.silu(h)
    return dense(cfg.dim, self.axes[1], name="fc2")(h)


class PatchEmbed(nn.Module):
  """Conv3d with kernel = stride = patch, as a matmul: [B, F, H, W, C] -> [B, F', H'*W', dim] f32."""
  cfg: WanConfig

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, tuple[int, int, int]]:
    cfg = self.cfg
    B, F, H, W, C = x.shape
    pt, ph, pw = cfg.patch_size
    if F % pt or H % ph or W % pw:
      raise ValueError(f"x frames/height/width {(F, H, W)} must be divisible by the patch "
                       f"size {cfg.patch_size}.")
    grid = (F // pt, H // ph, W // pw)
    pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    kernel = self.param("kernel", _init((None, None, None, None, "embed")),
                        (pt, ph, pw, C, cfg.dim), pdt)
    bias = self.param("bias", _init(("embed",), nn.initializers.zeros), (cfg.dim,), pdt)
    xp = x.reshape(B, grid[0], pt, grid[1], ph, grid[2], pw, C)
    tokens = jnp.einsum("bfahcwdk,acdke->bfhwe", xp.astype(cdt), kernel.astype(cdt),
                        precision=cfg.precision) + _lead(bias.astype(cdt), 5)
    return tokens.reshape(B, grid[0], grid[1] * grid[2], cfg.dim).astype(jnp.float32), grid


class Head(nn.Module):
  """Output head, modulated by e (not e0), float32; unpatchifies to [B, F, H, W, C_out]."""
  cfg: WanConfig

  @nn.compact
  def __call__(self, x: Array, e: Array, grid: tuple[int, int, int]) -> Array:
    cfg = self.cfg
    B = x.shape[0]
    modulation = self.param("modulation",
                            _init((None, "embed"), nn.initializers.normal(cfg.dim**-0.5)),
                            (2, cfg.dim), jnp.float32)
    mod = modulation[None, None] + e[:, :, None, :]  # [B, F', 2, dim]
    shift, scale = mod[:, :, 0, None, :], mod[:, :, 1, None, :]
    h = _layer_norm(x, cfg.eps) * (1 + scale) + shift
    out = Dense(cfg.out_channels * cfg.patch_volume, ("embed", None), dtype=jnp.float32,
                param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision, name="head")(h)
    pt, ph, pw = cfg.patch_size
    f, hh, ww = grid
    out = out.reshape(B, f, hh, ww, pt, ph, pw, cfg.out_channels)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return out.reshape(B, f * pt, hh * ph, ww * pw, cfg.out_channels)


def _record_tap(buf: Array, x: Array, index: Array, taps: tuple[int, ...], num_layers: int):
  """Writes x into buf[slot] when layer `index` is a tapped layer (one slot copied, not the buffer)."""
  table = np.full((num_layers,), -1, np.int32)
  for slot, layer in enumerate(taps):
    table[layer] = slot
  slot = jnp.asarray(table)[index]
  safe = jnp.maximum(slot, 0)
  current = jax.lax.dynamic_index_in_dim(buf, safe, axis=0, keepdims=False)
  new = jnp.where(slot >= 0, x, current)
  return jax.lax.dynamic_update_index_in_dim(buf, new, safe, axis=0)


def cache_slot(frame: Array, capacity: int, sink: int) -> Array:
  """Cache frame slot of absolute frame `frame`: itself below capacity, then a ring after the sink."""
  ring = capacity - sink
  return jnp.where(frame < capacity, frame, sink + (frame - sink) % ring)


def write_chunk(k_cache: Array, v_cache: Array, k: Array, v: Array, frame_offset: Array,
                 frames: int, tokens_per_frame: int, sink: int) -> tuple[Array, Array]:
  """Writes a chunk's K/V ([..., B, frames * S, N, D]) into its frame slots of the cache
  ([..., B, capacity * S, N, D]; leading axes, e.g. layers, are written whole)."""
  axis = k_cache.ndim - 3
  capacity = k_cache.shape[axis] // tokens_per_frame
  for j in range(frames):
    start = cache_slot(frame_offset + j, capacity, sink) * tokens_per_frame
    part = lambda a: jax.lax.slice_in_dim(a, j * tokens_per_frame, (j + 1) * tokens_per_frame,
                                          axis=axis)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, part(k), start, axis=axis)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, part(v), start, axis=axis)
  return k_cache, v_cache
