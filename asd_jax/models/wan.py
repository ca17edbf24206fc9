"""Wan 2.1 DiT in Flax linen: bidirectional, block-causal, and chunk-by-chunk with a KV cache.

One `WanModel` serves teacher, student, critic and discriminator backbone; they differ by params and
call arguments only. The forward follows the original Wan code (see shared spec WAN.md section 2):

  tokens = patchify(x); e, e0 = time MLP(t); ctx = text MLP(context)
  per block: x += gate_msa * self_attn(mod(LN(x))); x += cross_attn(LN_affine(x), ctx);
             x += gate_ffn * ffn(mod(LN(x)))
  v = unpatchify(head(mod(LN(x), e)))

Precision: params are float32. `WanConfig.dtype` is the compute dtype of the matmuls and attention;
the time MLP, modulation, norms, residual stream and head stay float32 as in the original.

Parameter layout (the converter maps the PyTorch names onto it): the transformer blocks are stacked,
every leaf under `blocks` has a leading `[num_layers]` axis, and the blocks run under `nn.scan`
(fully unrolled when `scan_layers=False`).

Calls:
  module.apply({'params': p}, x, t, context) -> v                       # bidirectional
  module.apply({'params': p}, x, t, context, causal=True) -> v          # block-causal, no cache
  module.apply({'params': p}, x, t, context, taps=(12, 21, 29)) -> (v, hidden [3, B, T, dim])
  cache = module.apply({'params': p}, context, batch..., method='init_cache')
  v, cache = module.apply({'params': p}, x_chunk, t, cache, frame_offset, method='forward_chunk')
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.models.attention import attention

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture and execution settings of a Wan 2.1 DiT.

  The architecture fields match the original `WanModel` arguments; `config.json` written by the
  converter holds exactly `to_dict()`.
  """
  dim: int = 1536
  ffn_dim: int = 8960
  num_heads: int = 12
  num_layers: int = 30
  freq_dim: int = 256
  text_dim: int = 4096
  text_len: int = 512
  patch_size: tuple[int, int, int] = (1, 2, 2)
  in_channels: int = 16
  out_channels: int = 16
  eps: float = 1e-6
  qk_norm: bool = True
  cross_attn_norm: bool = True
  rope_max_len: int = 1024
  rope_theta: float = 10000.0
  # Execution (not architecture): free to change at load time.
  dtype: str = "float32"  # compute dtype of matmuls and attention: float32 | bfloat16
  param_dtype: str = "float32"
  precision: str | None = None  # lax.Precision for matmuls; "highest" for fp32 parity on TPU
  attention_impl: str = "auto"  # see asd_jax.models.attention
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  scan_layers: bool = True  # False unrolls the layer loop (faster run, slower compile)
  chunk_frames: int = 3  # latent frames per causal chunk

  ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len",
                 "patch_size", "in_channels", "out_channels", "eps", "qk_norm", "cross_attn_norm",
                 "rope_max_len", "rope_theta")

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    self.validate()

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def patch_volume(self) -> int:
    return math.prod(self.patch_size)

  def validate(self) -> None:
    if self.dim % self.num_heads:
      raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings.")
    if self.freq_dim % 2:
      raise ValueError(f"freq_dim {self.freq_dim} must be even.")
    if len(self.patch_size) != 3:
      raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)}.")
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(_REMAT_POLICIES)}, "
                       f"got '{self.remat_policy}'.")
    if self.chunk_frames < 1:
      raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}.")

  def replace(self, **changes) -> "WanConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["patch_size"] = list(self.patch_size)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "WanConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown WanConfig fields {unknown}; known: {sorted(names)}.")
    return cls(**d)

  @classmethod
  def preset(cls, name: str, **overrides) -> "WanConfig":
    """'1.3b', '14b' (Wan 2.1 T2V) or 'tiny' (a few-thousand-parameter model for tests)."""
    key = name.lower().replace("wan", "").replace("-", "").replace("_", "").strip()
    if key not in PRESETS:
      raise ValueError(f"Unknown Wan preset '{name}'; choose one of {sorted(PRESETS)}.")
    return cls(**{**PRESETS[key], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "tiny": dict(dim=48, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=32),
}

_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# ----------------------------------------------------------------------------------------------
# KV cache.


@flax.struct.dataclass
class KVCache:
  """Per-layer self-attention K/V of earlier chunks plus the text cross-attention K/V.

  Keys are stored after RoPE, at absolute frame positions. Frame f lives in cache frame slot f while
  f < capacity; past that the first `sink_frames` slots stay and the rest form a ring buffer (a
  rolling window). Attention is order-free over keys, so a ring buffer equals the shifted window.
  """
  k_LBSND: Array  # [layers, B, capacity * tokens_per_frame, heads, head_dim]
  v_LBSND: Array
  cross_k_LBCND: Array  # [layers, B, text_len, heads, head_dim]
  cross_v_LBCND: Array
  tokens_per_frame: int = flax.struct.field(pytree_node=False)
  sink_frames: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def capacity_frames(self) -> int:
    return self.k_LBSND.shape[2] // self.tokens_per_frame


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
  arg = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Real channels given to (time, height, width): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=16)
def _rope_angle_tables(head_dim: int, max_len: int, theta: float) -> tuple[np.ndarray, ...]:
  """Per-axis angle tables [max_len, axis_dim // 2], computed in float64 like the reference."""
  tables = []
  for d in rope_axis_dims(head_dim):
    inv = 1.0 / theta**(np.arange(0, d, 2, dtype=np.float64) / d)
    tables.append(np.outer(np.arange(max_len, dtype=np.float64), inv))
  return tuple(tables)


def rope_cos_sin(cfg: WanConfig, frames: int, height: int, width: int,
                 frame_offset: Array | int = 0) -> tuple[Array, Array]:
  """cos, sin of the 3D RoPE angles, each [frames * height * width, head_dim // 2] float32.

  Token order is (f, h, w) row-major; the time position is `frame_offset + f`.
  """
  tf, th, tw = _rope_angle_tables(cfg.head_dim, cfg.rope_max_len, cfg.rope_theta)
  cos_sin = []
  for fn in (np.cos, np.sin):
    t_tab, h_tab, w_tab = (jnp.asarray(fn(a), jnp.float32) for a in (tf, th, tw))
    f_pos = frame_offset + jnp.arange(frames)
    parts = [
        jnp.broadcast_to(t_tab[f_pos][:, None, None], (frames, height, width, t_tab.shape[1])),
        jnp.broadcast_to(h_tab[:height][None, :, None], (frames, height, width, h_tab.shape[1])),
        jnp.broadcast_to(w_tab[:width][None, None, :], (frames, height, width, w_tab.shape[1])),
    ]
    cos_sin.append(jnp.concatenate(parts, axis=-1).reshape(frames * height * width, -1))
  return cos_sin[0], cos_sin[1]


def apply_rope(x_BTND: Array, cos_TK: Array, sin_TK: Array) -> Array:
  """Rotates interleaved channel pairs (x[2i], x[2i+1]) as complex numbers; float32 math."""
  dtype = x_BTND.dtype
  x = x_BTND.astype(jnp.float32).reshape(*x_BTND.shape[:-1], -1, 2)
  x1, x2 = x[..., 0], x[..., 1]
  c, s = cos_TK[None, :, None, :], sin_TK[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(x_BTND.shape).astype(dtype)


def block_causal_mask(frames: int, tokens_per_frame: int, chunk_frames: int) -> Array:
  """[1, 1, T, T] bool: a query of chunk c sees keys of chunks <= c."""
  chunk = np.arange(frames) // chunk_frames
  chunk = np.repeat(chunk, tokens_per_frame)
  return jnp.asarray(chunk[:, None] >= chunk[None, :])[None, None]


# ----------------------------------------------------------------------------------------------
# Layers.


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
    return y + bias.astype(self.dtype)


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
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class AffineLayerNorm(nn.Module):
  """LayerNorm with scale and bias, float32 (`norm3` of the original block)."""
  eps: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", _init(("embed",), nn.initializers.ones), (d,), jnp.float32)
    bias = self.param("bias", _init(("embed",), nn.initializers.zeros), (d,), jnp.float32)
    return _layer_norm(x, self.eps) * scale + bias


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
      k_cache, v_cache = _write_chunk(xs["k"], xs["v"], k.astype(xs["k"].dtype),
                                      v.astype(xs["v"].dtype), attn_args["frame_offset"], F, S,
                                      self.sink_frames)
      new_cache = {"k": k_cache, "v": v_cache}
      a = attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                    kv_lengths=attn_args["kv_lengths"], impl=cfg.attention_impl)
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
                        precision=cfg.precision) + bias.astype(cdt)
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


def _write_chunk(k_cache: Array, v_cache: Array, k: Array, v: Array, frame_offset: Array,
                 frames: int, tokens_per_frame: int, sink: int) -> tuple[Array, Array]:
  """Writes a chunk's K/V ([B, frames * S, N, D]) into its frame slots of the cache."""
  capacity = k_cache.shape[1] // tokens_per_frame
  for j in range(frames):
    start = cache_slot(frame_offset + j, capacity, sink) * tokens_per_frame
    sl = slice(j * tokens_per_frame, (j + 1) * tokens_per_frame)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k[:, sl], start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v[:, sl], start, axis=1)
  return k_cache, v_cache


# ----------------------------------------------------------------------------------------------
# The model.


class WanModel(nn.Module):
  """Wan 2.1 DiT. See the module docstring for the calls and shapes."""
  config: WanConfig

  def _blocks(self, mode: str, taps: tuple[int, ...] = (), sink_frames: int = 0):
    cfg = self.config
    block = Block
    policy = _REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        unroll=1 if cfg.scan_layers else cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack(cfg, mode=mode, taps=taps, sink_frames=sink_frames, name="blocks")

  def _dense(self, features, axes, name, dtype=None):
    cfg = self.config
    return Dense(features, axes, dtype=jnp.dtype(dtype or cfg.dtype),
                 param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision, name=name)

  def _embed_text(self, context: Array) -> Array:
    cfg = self.config
    if context.shape[-1] != cfg.text_dim:
      raise ValueError(f"context has {context.shape[-1]} channels, the model expects "
                       f"text_dim={cfg.text_dim} ([B, L, {cfg.text_dim}]).")
    return MLP(cfg, cfg.dim, (("text_embed", "embed"), ("embed", "embed_out")), "gelu",
               jnp.dtype(cfg.dtype), name="text_embedding")(context)

  def _embed_time(self, t: Array, batch: int, frames: int) -> tuple[Array, Array]:
    """t [B] or [B, F] (latent frames) -> e [B, F', dim], e0 [B, F', 6, dim], float32."""
    cfg = self.config
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 1:
      t = jnp.broadcast_to(t[:, None], (batch, frames))
    elif t.ndim == 2:
      if t.shape[1] != frames * cfg.patch_size[0]:
        raise ValueError(f"per-frame timesteps have {t.shape[1]} frames, x has "
                         f"{frames * cfg.patch_size[0]}.")
      t = t[:, ::cfg.patch_size[0]]
    else:
      raise ValueError(f"timesteps must be [B] or [B, F], got shape {t.shape}.")
    emb = sinusoidal_embedding(t, cfg.freq_dim)
    f32 = jnp.float32
    e = MLP(cfg, cfg.dim, (("freq", "embed"), ("embed", "embed_out")), "silu", f32,
            name="time_embedding")(emb)
    e0 = self._dense(6 * cfg.dim, ("embed", "modulation"), "time_projection", f32)(nn.silu(e))
    return e, e0.reshape(*e0.shape[:-1], 6, cfg.dim)

  def _patchify(self, x: Array) -> tuple[Array, tuple[int, int, int]]:
    cfg = self.config
    if x.shape[-1] != cfg.in_channels:
      raise ValueError(f"x has {x.shape[-1]} channels, the model expects "
                       f"in_channels={cfg.in_channels} ([B, F, H, W, {cfg.in_channels}]).")
    return PatchEmbed(cfg, name="patch_embedding")(x)

  def _head(self, x: Array, e: Array, grid: tuple[int, int, int]) -> Array:
    return Head(self.config, name="head")(x, e, grid)

  @nn.compact
  def __call__(self,
               x: Array,
               t: Array,
               context: Array | None = None,
               *,
               causal: bool = False,
               taps: Sequence[int] = (),
               cache: KVCache | None = None,
               frame_offset: Array | int = 0,
               mode: str = "full"):
    """Bidirectional or block-causal forward.

    Args:
      x: [B, F, H, W, C] noisy latents.
      t: [B] or [B, F] timesteps in [0, 1000] (fractional values allowed).
      context: [B, L, text_dim] text embeddings (umT5 output, zero-padded to L).
      causal: block-causal attention over chunks of `config.chunk_frames` latent frames.
      taps: 0-based block indices whose output hidden states are also returned.

    Returns:
      v [B, F, H, W, C] float32 (the flow velocity), or (v, hidden [len(taps), B, T, dim]) with taps.
    """
    cfg = self.config
    if mode == "context":
      return self._context_kv(context)
    if mode == "chunk":
      return self._chunk(x, t, cache, frame_offset)
    taps = tuple(int(i) for i in taps)
    for i in taps:
      if not 0 <= i < cfg.num_layers:
        raise ValueError(f"tap index {i} is outside the {cfg.num_layers} blocks.")
    tokens, grid = self._patchify(x)
    B = x.shape[0]
    e, e0 = self._embed_time(t, B, grid[0])
    ctx = self._embed_text(context)
    S = grid[1] * grid[2]
    attn_args = {}
    if causal:
      attn_args["mask"] = block_causal_mask(grid[0], S, self._chunk_tokens_frames())
    rope = rope_cos_sin(cfg, *grid)
    taps_buf = jnp.zeros((len(taps),) + tokens.shape, jnp.float32) if taps else None
    xs = {"index": jnp.arange(cfg.num_layers)}
    (h, taps_buf), _ = self._blocks("full", taps)((tokens, taps_buf), e0, rope, ctx, attn_args, xs)
    v = self._head(h, e, grid)
    if taps:
      return v, taps_buf.reshape(len(taps), B, grid[0] * S, cfg.dim)
    return v

  def _chunk_tokens_frames(self) -> int:
    cfg = self.config
    if cfg.chunk_frames % cfg.patch_size[0]:
      raise ValueError(f"chunk_frames {cfg.chunk_frames} must be a multiple of the temporal "
                       f"patch {cfg.patch_size[0]}.")
    return cfg.chunk_frames // cfg.patch_size[0]

  def _context_kv(self, context: Array) -> tuple[Array, Array]:
    ctx = self._embed_text(context)
    xs = {"index": jnp.arange(self.config.num_layers)}
    _, kv = self._blocks("context")((jnp.zeros(()), None), None, None, ctx, {}, xs)
    return kv["cross_k"], kv["cross_v"]

  def _chunk(self, x: Array, t: Array, cache: KVCache, frame_offset) -> tuple[Array, KVCache]:
    cfg = self.config
    tokens, grid = self._patchify(x)
    B = x.shape[0]
    S = grid[1] * grid[2]
    if S != cache.tokens_per_frame:
      raise ValueError(f"chunk has {S} tokens per frame, the cache was made for "
                       f"{cache.tokens_per_frame}.")
    capacity = cache.capacity_frames
    if grid[0] > capacity - cache.sink_frames:
      raise ValueError(f"a chunk of {grid[0]} frames does not fit a cache of {capacity} frames "
                       f"with {cache.sink_frames} sink frames.")
    frame_offset = jnp.asarray(frame_offset, jnp.int32)
    e, e0 = self._embed_time(t, B, grid[0])
    end = jnp.minimum(frame_offset + grid[0], capacity)
    attn_args = {"frame_offset": frame_offset,
                 "kv_lengths": jnp.full((B,), end * S, jnp.int32)}
    rope = rope_cos_sin(cfg, grid[0], grid[1], grid[2], frame_offset)
    xs = {"index": jnp.arange(cfg.num_layers), "k": cache.k_LBSND, "v": cache.v_LBSND,
          "cross_k": cache.cross_k_LBCND, "cross_v": cache.cross_v_LBCND}
    (h, _), kv = self._blocks("chunk", sink_frames=cache.sink_frames)(
        (tokens, None), e0, rope, None, attn_args, xs)
    v = self._head(h, e, grid)
    return v, cache.replace(k_LBSND=kv["k"], v_LBSND=kv["v"])

  # Public methods for `module.apply(..., method=...)`.

  def init_cache(self, context: Array, *, height: int, width: int, capacity_frames: int,
                 sink_frames: int = 0, cache_dtype: Any = None) -> KVCache:
    """An empty self-attention cache plus the text K/V of `context` [B, L, text_dim].

    height, width: latent size (before patching); capacity_frames: latent frames the cache holds
    (e.g. 21); sink_frames: frames kept for ever once the window rolls.
    """
    cfg = self.config
    pt, ph, pw = cfg.patch_size
    if height % ph or width % pw:
      raise ValueError(f"latent size {(height, width)} is not divisible by the patch {(ph, pw)}.")
    if capacity_frames % pt:
      raise ValueError(f"capacity_frames {capacity_frames} must be a multiple of {pt}.")
    if not 0 <= sink_frames < capacity_frames:
      raise ValueError(f"sink_frames must be in [0, {capacity_frames}), got {sink_frames}.")
    S = (height // ph) * (width // pw)
    cap = capacity_frames // pt
    dtype = jnp.dtype(cache_dtype or cfg.dtype)
    cross_k, cross_v = self(None, None, context, mode="context")
    B = context.shape[0]
    shape = (cfg.num_layers, B, cap * S, cfg.num_heads, cfg.head_dim)
    return KVCache(k_LBSND=jnp.zeros(shape, dtype), v_LBSND=jnp.zeros(shape, dtype),
                   cross_k_LBCND=cross_k.astype(dtype), cross_v_LBCND=cross_v.astype(dtype),
                   tokens_per_frame=S, sink_frames=sink_frames // pt)

  def forward_chunk(self, x: Array, t: Array, cache: KVCache,
                    frame_offset: Array | int) -> tuple[Array, KVCache]:
    """One causal chunk against the cache.

    x: [B, k, H, W, C] the chunk's noisy latents; t: [B] or [B, k]; frame_offset: the chunk's first
    latent frame (may be traced). Attends to the cached frames before the chunk plus the chunk itself,
    writes the chunk's K/V into its slots (a repeated call for the same chunk overwrites them) and
    returns (v [B, k, H, W, C] float32, the updated cache).
    """
    return self(x, t, None, cache=cache, frame_offset=frame_offset, mode="chunk")


# ----------------------------------------------------------------------------------------------
# Params without a forward pass.


def _dummy_inputs(cfg: WanConfig):
  pt, ph, pw = cfg.patch_size
  return (jnp.zeros((1, pt, ph, pw, cfg.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
          jnp.zeros((1, 1, cfg.text_dim), jnp.float32))


def init_params(cfg: WanConfig, rng: Array) -> Any:
  """Random params (plain arrays, float32 unless `param_dtype` says otherwise)."""
  module = WanModel(cfg)
  return nn.unbox(module.init(rng, *_dummy_inputs(cfg))["params"])


def abstract_params(cfg: WanConfig) -> Any:
  """The param tree as `jax.ShapeDtypeStruct`s; allocates nothing."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logical_axes(cfg: WanConfig) -> Any:
  """The param tree with a `jax.sharding.PartitionSpec` of logical axis names at every leaf."""
  boxed = jax.eval_shape(lambda: WanModel(cfg).init(jax.random.key(0), *_dummy_inputs(cfg)))
  return nn.get_partition_spec(boxed)["params"]
