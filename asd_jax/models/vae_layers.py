"""Layers of the Wan 2.1 VAE (see `asd_jax.models.vae` for the model, its calls and the config).

Every layer runs on a chunk of frames `[B, T, H, W, C]` (channels last) and is causal in time: a
3D conv sees only the frames before it. A layer with a temporal kernel takes the cache of the input
frames that precede the chunk (None at the start of a video, meaning zeros, i.e. the causal zero
padding of the reference) and returns the updated cache, so a video processed in chunks equals the
video processed whole. Caches are nested dicts of arrays named like the modules they belong to.

`first=True` marks the chunk that starts the video: it selects the reference's first-chunk
behaviour of the temporal resamplers (the first frame passes through them unchanged).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asd_jax.models.attention import attention

Array = jax.Array
Cache = dict[str, Any]
CACHE_T = 2  # input frames a temporal-kernel-3 conv keeps from the previous chunk


_FAN_IN_NORMAL = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _init(axes: tuple[str | None, ...], base=_FAN_IN_NORMAL):
  return nn.with_logical_partitioning(base, axes)


def _precision(precision: str | None):
  return None if precision is None else jax.lax.Precision(precision)


def lead(v: Array, ndim: int) -> Array:
  """A vector shaped to broadcast along the last axis of an ndim array (no rank promotion)."""
  return v.reshape((1,) * (ndim - 1) + v.shape[-1:])


class Conv3d(nn.Module):
  """3D conv, kernel [kt, kh, kw, C, F]; no temporal padding (see `causal`), spatial 'same'."""
  features: int
  kernel_size: tuple[int, int, int]
  stride_t: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kt, kh, kw = self.kernel_size
    kernel = self.param("kernel", _init((None, None, None, "vae_in", "vae_out")),
                        (kt, kh, kw, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", _init(("vae_out",), nn.initializers.zeros), (self.features,),
                      self.param_dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride_t, 1, 1),
        padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=_precision(self.precision))
    return y + lead(bias.astype(self.dtype), y.ndim)


class Conv2d(nn.Module):
  """2D conv applied to every frame of [B, T, H, W, C]; kernel [kh, kw, C, F]."""
  features: int
  kernel_size: tuple[int, int]
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    B, T, H, W, C = x.shape
    kh, kw = self.kernel_size
    kernel = self.param("kernel", _init((None, None, "vae_in", "vae_out")),
                        (kh, kw, C, self.features), self.param_dtype)
    bias = self.param("bias", _init(("vae_out",), nn.initializers.zeros), (self.features,),
                      self.param_dtype)
    y = jax.lax.conv_general_dilated(
        x.reshape(B * T, H, W, C).astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_precision(self.precision))
    y = y + lead(bias.astype(self.dtype), y.ndim)
    return y.reshape(B, T, *y.shape[1:])


def causal(conv: Conv3d, x: Array, cache: Array | None) -> tuple[Array, Array]:
  """Runs a temporal-kernel conv causally on a chunk: (y, new cache).

  cache: [B, kt - 1, H, W, C], the input frames just before x (None: zeros, the start of a video).
  The new cache is the last kt - 1 frames of cache + x, whatever the chunk length.
  """
  past_frames = conv.kernel_size[0] - 1
  if past_frames == 0:
    return conv(x), None
  B, _, H, W, C = x.shape
  past = jnp.zeros((B, past_frames, H, W, C), x.dtype) if cache is None else cache.astype(x.dtype)
  xp = jnp.concatenate([past, x], axis=1)
  return conv(xp), xp[:, -past_frames:]


class ChannelNorm(nn.Module):
  """Wan's "RMS_norm": x / ||x||_2 over channels * sqrt(C) * scale, normalised in float32."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    C = x.shape[-1]
    scale = self.param("scale", _init(("vae_norm",), nn.initializers.ones), (C,), self.param_dtype)
    xf = x.astype(jnp.float32)
    # F.normalize: x / max(||x||, 1e-12).
    inv = jax.lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), 1e-24))
    y = (xf * inv).astype(x.dtype)
    return y * lead((math.sqrt(C) * scale).astype(x.dtype), x.ndim)


class ResidualBlock(nn.Module):
  """RMS - SiLU - causal conv 3 - RMS - SiLU - causal conv 3, plus a 1x1x1 shortcut if C changes."""
  out_dim: int
  dtype: Any
  param_dtype: Any
  precision: str | None

  def _conv(self, features, kernel, name):
    return Conv3d(features, kernel, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision, name=name)

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None) -> tuple[Array, Cache]:
    cache = cache or {}
    h = x if x.shape[-1] == self.out_dim else self._conv(self.out_dim, (1, 1, 1),
                                                          "conv_shortcut")(x)
    y = nn.silu(ChannelNorm(self.param_dtype, name="norm1")(x))
    y, c1 = causal(self._conv(self.out_dim, (3, 3, 3), "conv1"), y, cache.get("conv1"))
    y = nn.silu(ChannelNorm(self.param_dtype, name="norm2")(y))  # (dropout 0 at inference)
    y, c2 = causal(self._conv(self.out_dim, (3, 3, 3), "conv2"), y, cache.get("conv2"))
    return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
  """Single-head self-attention over the pixels of each frame (no mixing across frames)."""
  dtype: Any
  param_dtype: Any
  precision: str | None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    B, T, H, W, C = x.shape
    conv = lambda f, name: Conv2d(f, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                                  precision=self.precision, name=name)
    qkv = conv(3 * C, "to_qkv")(ChannelNorm(self.param_dtype, name="norm")(x))
    q, k, v = (t.reshape(B * T, H * W, 1, C) for t in jnp.split(qkv, 3, axis=-1))
    a = attention(q, k, v, impl="auto").reshape(B, T, H, W, C)
    return x + conv(C, "proj")(a)


class MidBlock(nn.Module):
  """Residual block, attention, residual block."""
  dtype: Any
  param_dtype: Any
  precision: str | None

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None) -> tuple[Array, Cache]:
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    C = x.shape[-1]
    x, c0 = ResidualBlock(C, **kw, name="resnets_0")(x, cache.get("resnets_0"))
    x = AttentionBlock(**kw, name="attentions_0")(x)
    x, c1 = ResidualBlock(C, **kw, name="resnets_1")(x, cache.get("resnets_1"))
    return x, {"resnets_0": c0, "resnets_1": c1}


def _interleave_frames(y: Array) -> Array:
  """[B, T, H, W, 2C] -> [B, 2T, H, W, C]: channel half s of frame t becomes frame 2t + s."""
  B, T, H, W, C2 = y.shape
  y = y.reshape(B, T, H, W, 2, C2 // 2).transpose(0, 1, 4, 2, 3, 5)
  return y.reshape(B, 2 * T, H, W, C2 // 2)


class Resample(nn.Module):
  """x2 spatial (and optionally temporal) down/up sampling.

  mode:
    downsample2d: zero-pad right/bottom by 1, 3x3 conv stride 2.
    downsample3d: the same, then a (3,1,1) conv with temporal stride 2 over the previous chunk's
      last frame + this chunk. The video's first frame passes through it unchanged, so a first
      chunk of T = 1 + 2n frames gives 1 + n frames and a later chunk of 2n frames gives n.
    upsample2d: nearest x2, 3x3 conv C -> C/2.
    upsample3d: first a causal (3,1,1) conv C -> 2C whose channel halves become the even and odd
      output frames (T -> 2T), then as upsample2d. The video's first frame skips the temporal conv
      (a first chunk of T frames gives 1 + 2(T - 1)), and the conv sees zeros before the second.
  """
  mode: str
  dtype: Any
  param_dtype: Any
  precision: str | None

  @nn.compact
  def __call__(self, x: Array, cache: Array | None, first: bool) -> tuple[Array, Array | None]:
    B, T, H, W, C = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    new_cache = None
    if self.mode == "upsample3d":
      time_conv = Conv3d(2 * C, (3, 1, 1), **kw, name="time_conv")
      if first:
        if T > 1:
          y, new_cache = causal(time_conv, x[:, 1:], None)
          x = jnp.concatenate([x[:, :1], _interleave_frames(y)], axis=1)
        else:
          new_cache = jnp.zeros((B, CACHE_T, H, W, C), x.dtype)
      else:
        y, new_cache = causal(time_conv, x, cache)
        x = _interleave_frames(y)

    if self.mode.startswith("upsample"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact x2
      x = Conv2d(C // 2, (3, 3), padding=((1, 1), (1, 1)), **kw, name="resample")(x)
    elif self.mode.startswith("downsample"):
      x = Conv2d(C, (3, 3), stride=2, padding=((0, 1), (0, 1)), **kw, name="resample")(x)
    else:
      raise ValueError(f"unknown resample mode {self.mode!r}.")

    if self.mode == "downsample3d":
      time_conv = Conv3d(C, (3, 1, 1), stride_t=2, **kw, name="time_conv")
      if first:
        if T % 2 == 0:
          raise ValueError(f"the first chunk reaching a temporal downsample must have an odd "
                           f"number of frames, got {T}.")
        y = x if T == 1 else jnp.concatenate([x[:, :1], time_conv(x)], axis=1)
      else:
        if T % 2:
          raise ValueError(f"a later chunk reaching a temporal downsample must have an even "
                           f"number of frames, got {T}.")
        y = time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
      x, new_cache = y, x[:, -1:]
    return x, new_cache


class UpBlock(nn.Module):
  """num_res_blocks + 1 residual blocks, then an optional upsampler."""
  out_dim: int
  num_res_blocks: int
  upsample_mode: str | None
  dtype: Any
  param_dtype: Any
  precision: str | None

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None, first: bool) -> tuple[Array, Cache]:
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    new = {}
    for j in range(self.num_res_blocks + 1):
      name = f"resnets_{j}"
      x, new[name] = ResidualBlock(self.out_dim, **kw, name=name)(x, cache.get(name))
    if self.upsample_mode is not None:
      resample = Resample(self.upsample_mode, **kw, name="upsampler")
      x, c = resample(x, cache.get("upsampler"), first)
      if c is not None:
        new["upsampler"] = c
    return x, new


def encoder_dims(base_dim: int, dim_mult: tuple[int, ...]) -> list[int]:
  return [base_dim * m for m in (1, *dim_mult)]


def decoder_dims(base_dim: int, dim_mult: tuple[int, ...]) -> list[int]:
  return [base_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]


class Encoder(nn.Module):
  """video chunk [B, T, H, W, 3] -> [B, T', H/s, W/s, 2 z_dim] (mu | logvar before quant_conv)."""
  base_dim: int
  z_dim: int
  dim_mult: tuple[int, ...]
  num_res_blocks: int
  temporal_downsample: tuple[bool, ...]
  dtype: Any
  param_dtype: Any
  precision: str | None

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None, first: bool) -> tuple[Array, Cache]:
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    dims = encoder_dims(self.base_dim, self.dim_mult)
    new = {}
    x, new["conv_in"] = causal(Conv3d(dims[0], (3, 3, 3), **kw, name="conv_in"),
                               x.astype(self.dtype), cache.get("conv_in"))
    n = 0
    for i, out_dim in enumerate(dims[1:]):
      for _ in range(self.num_res_blocks):
        name = f"down_blocks_{n}"
        x, new[name] = ResidualBlock(out_dim, **kw, name=name)(x, cache.get(name))
        n += 1
      if i != len(self.dim_mult) - 1:
        name = f"down_blocks_{n}"
        mode = "downsample3d" if self.temporal_downsample[i] else "downsample2d"
        x, c = Resample(mode, **kw, name=name)(x, cache.get(name), first)
        if c is not None:
          new[name] = c
        n += 1
    x, new["mid_block"] = MidBlock(**kw, name="mid_block")(x, cache.get("mid_block"))
    x = nn.silu(ChannelNorm(self.param_dtype, name="norm_out")(x))
    x, new["conv_out"] = causal(Conv3d(2 * self.z_dim, (3, 3, 3), **kw, name="conv_out"), x,
                                cache.get("conv_out"))
    return x, new


class Decoder(nn.Module):
  """latent chunk [B, k, h, w, z_dim] (after post_quant_conv) -> video chunk [B, n, H, W, 3]."""
  base_dim: int
  z_dim: int
  dim_mult: tuple[int, ...]
  num_res_blocks: int
  temporal_upsample: tuple[bool, ...]
  dtype: Any
  param_dtype: Any
  precision: str | None

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None, first: bool) -> tuple[Array, Cache]:
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    dims = decoder_dims(self.base_dim, self.dim_mult)
    new = {}
    x, new["conv_in"] = causal(Conv3d(dims[0], (3, 3, 3), **kw, name="conv_in"),
                               x.astype(self.dtype), cache.get("conv_in"))
    x, new["mid_block"] = MidBlock(**kw, name="mid_block")(x, cache.get("mid_block"))
    last = len(self.dim_mult) - 1
    for i, out_dim in enumerate(dims[1:]):
      mode = None
      if i != last:
        mode = "upsample3d" if self.temporal_upsample[i] else "upsample2d"
      name = f"up_blocks_{i}"
      x, new[name] = UpBlock(out_dim, self.num_res_blocks, mode, **kw, name=name)(
          x, cache.get(name), first)
    x = nn.silu(ChannelNorm(self.param_dtype, name="norm_out")(x))
    x, new["conv_out"] = causal(Conv3d(3, (3, 3, 3), **kw, name="conv_out"), x,
                                cache.get("conv_out"))
    return x, new
