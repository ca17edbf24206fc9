"""Wan 2.1 VAE in Flax linen: video <-> normalised latents, plus a streaming decoder.

The network follows the original Wan VAE (shared spec WAN.md section 5; diffusers'
`AutoencoderKLWan` is the reference implementation): causal 3D convs with all temporal padding in
front, Wan's "RMS_norm", per-frame attention in the middle blocks, x2 temporal down/up sampling in
two stages with a first-frame special case, so that T = 1 + 4k pixel frames <-> F = 1 + k latent
frames and 8x spatial compression. Channels last throughout.

Calls (`module = WanVAE(VAEConfig.preset('wan2.1'))`, params from `init_params` or
`asd_jax.pretrained.load`):

  latents = module.apply({'params': p}, video, method='encode')    # [B, T, H, W, 3] in [-1, 1]
                                                                    # -> [B, F, H/8, W/8, 16]
  video = module.apply({'params': p}, latents, method='decode')    # -> [B, T, H, W, 3] in [-1, 1]

`encode` returns the posterior mean normalised with the Wan latent statistics, (mu - mean) / std;
`decode` undoes it (z * std + mean) and clamps its output to [-1, 1].

Both process the video in causal chunks carrying the conv caches, as the reference does (encode:
frame 0, then 4 frames per latent frame; decode: one latent frame at a time), under `nn.scan`, so
memory stays that of one chunk. `latent_frames_per_step` trades memory for speed (None: the whole
video in one pass). Every chunking gives the same result up to float rounding.

Streaming decoder (real-time output while later latents are still being generated):

  state = module.init_decode_state(batch, latent_height, latent_width)   # needs no params
  frames, state = module.apply({'params': p}, state, z_chunk, method='decode_chunk')

`z_chunk` is [B, k, h, w, z] (any k >= 1, normalised as `decode` takes them). The first chunk of a
video gives 4k - 3 frames, later chunks 4k (3 latent frames: 9, then 12). `DecodeState` holds every
causal-conv cache as arrays of fixed shape plus one static flag, `started` (pytree aux data): the
first chunk is a separate trace (its output has fewer frames), after which every later chunk of the
same size reuses one compiled function, and later chunks can run under `jax.lax.scan` with the
state as carry:

  step = jax.jit(lambda p, s, z: module.apply({'params': p}, s, z, method='decode_chunk'))
  frames0, state = step(params, state, z[:, :3])                        # chunk 0: 9 frames
  state, frames = jax.lax.scan(lambda s, z: step(params, s, z)[::-1], state, later_chunks)

Precision: params are stored in `param_dtype` (float32 by default); convs, attention and the
residual stream run in `dtype`; the norms normalise in float32; outputs are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.models import vae_layers as layers

__all__ = ["VAEConfig", "PRESETS", "WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD", "DecodeState",
           "WanVAE", "init_params", "abstract_params", "logical_axes", "decode_cache_shapes"]

Array = jax.Array

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687,
                     2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# ----------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture and execution settings of a Wan 2.1 VAE.

  Architecture fields match the original `WanVAE_` (diffusers `AutoencoderKLWan`) arguments;
  `config.json` written by the converter holds exactly `to_dict()`.
  """
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  # Execution (not architecture): free to change at load time.
  dtype: str = "float32"  # compute dtype of convs, attention and the residual stream
  param_dtype: str = "float32"
  precision: str | None = None  # lax.Precision of the convs; "highest" for fp32 parity on TPU/GPU

  ARCH_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temporal_downsample")
  # Latent statistics are not weights: they may be changed at load time, but they change the
  # meaning of the latents.
  STAT_FIELDS = ("latents_mean", "latents_std")

  def __post_init__(self):
    object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
    object.__setattr__(self, "temporal_downsample",
                       tuple(bool(t) for t in self.temporal_downsample))
    object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
    object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
    self.validate()

  @property
  def temporal_factor(self) -> int:
    """Pixel frames per latent frame (after the first)."""
    return 2**sum(self.temporal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2**(len(self.dim_mult) - 1)

  @property
  def temporal_upsample(self) -> tuple[bool, ...]:
    return self.temporal_downsample[::-1]

  def validate(self) -> None:
    if not self.dim_mult or min(self.dim_mult) < 1 or self.base_dim < 1 or self.z_dim < 1:
      raise ValueError(f"base_dim, z_dim and dim_mult must be positive, got {self.base_dim}, "
                       f"{self.z_dim}, {self.dim_mult}.")
    if self.num_res_blocks < 1:
      raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}.")
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"temporal_downsample needs one entry per downsample "
                       f"({len(self.dim_mult) - 1}), got {self.temporal_downsample}.")
    for name in self.STAT_FIELDS:
      if len(getattr(self, name)) != self.z_dim:
        raise ValueError(f"{name} has {len(getattr(self, name))} values, z_dim is {self.z_dim}.")
    if any(s <= 0 for s in self.latents_std):
      raise ValueError(f"latents_std must be positive, got {self.latents_std}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}.")

  def replace(self, **changes) -> "VAEConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for k in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
      d[k] = list(d[k])
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown VAEConfig fields {unknown}; known: {sorted(names)}.")
    return cls(**d)

  @classmethod
  def preset(cls, name: str, **overrides) -> "VAEConfig":
    """'wan2.1' (the released VAE, 126.9M params) or 'tiny' (a few-thousand-param test model)."""
    key = name.lower().replace("-", "").replace("_", "").strip()
    key = {"wan21": "wan2.1", "wan2.1": "wan2.1"}.get(key, key)
    if key not in PRESETS:
      raise ValueError(f"Unknown VAE preset '{name}'; choose one of {sorted(PRESETS)}.")
    return cls(**{**PRESETS[key], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1": {},
    "tiny": dict(base_dim=8, z_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1,
                 latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
}

# ----------------------------------------------------------------------------------------------
# Streaming decoder state.


@flax.struct.dataclass
class DecodeState:
  """Caches of the streaming decoder: for every causal conv the last input frames it has seen.

  caches: nested dict named after the decoder's modules; each leaf [B, 2, h_l, w_l, C_l] in the
    compute dtype (zeros before the first chunk).
  started: static; False until the video's first chunk has been decoded (that chunk takes the
    reference's first-chunk path and gives 4k - 3 frames instead of 4k).
  """
  caches: Any
  started: bool = flax.struct.field(pytree_node=False, default=False)


def decode_cache_shapes(cfg: VAEConfig, batch: int, height: int,
                        width: int) -> dict[str, Any]:
  """Shapes of `DecodeState.caches` for latents [batch, k, height, width, z_dim]."""
  dims = layers.decoder_dims(cfg.base_dim, cfg.dim_mult)
  t = layers.CACHE_T

  def res(c_in, c_out, h, w):
    return {"conv1": (batch, t, h, w, c_in), "conv2": (batch, t, h, w, c_out)}

  h, w = height, width
  shapes = {"conv_in": (batch, t, h, w, cfg.z_dim),
            "mid_block": {"resnets_0": res(dims[0], dims[0], h, w),
                          "resnets_1": res(dims[0], dims[0], h, w)}}
  c = dims[0]
  for i, out_dim in enumerate(dims[1:]):
    block = {}
    for j in range(cfg.num_res_blocks + 1):
      block[f"resnets_{j}"] = res(c, out_dim, h, w)
      c = out_dim
    if i != len(cfg.dim_mult) - 1:
      if cfg.temporal_upsample[i]:
        block["upsampler"] = (batch, t, h, w, out_dim)
      h, w, c = 2 * h, 2 * w, out_dim // 2
    shapes[f"up_blocks_{i}"] = block
  shapes["conv_out"] = (batch, t, h, w, dims[-1])
  return shapes


# ----------------------------------------------------------------------------------------------
# The model.


class WanVAE(nn.Module):
  """Wan 2.1 VAE. See the module docstring for the calls and shapes."""
  config: VAEConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
              precision=cfg.precision)
    arch = dict(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=cfg.dim_mult,
                num_res_blocks=cfg.num_res_blocks)
    self.encoder = layers.Encoder(**arch, temporal_downsample=cfg.temporal_downsample, **kw)
    self.quant_conv = layers.Conv3d(2 * cfg.z_dim, (1, 1, 1), **kw)
    self.post_quant_conv = layers.Conv3d(cfg.z_dim, (1, 1, 1), **kw)
    self.decoder = layers.Decoder(**arch, temporal_upsample=cfg.temporal_upsample, **kw)

  def _stats(self, ndim: int) -> tuple[Array, Array]:
    mean = jnp.asarray(np.asarray(self.config.latents_mean, np.float32))
    std = jnp.asarray(np.asarray(self.config.latents_std, np.float32))
    return layers.lead(mean, ndim), layers.lead(std, ndim)

  def _chunked(self, net: nn.Module, x: Array, first_frames: int, step_frames: int | None):
    """Runs `net` over x [B, T, ...] causally: the first `first_frames` frames as the video's first
    chunk, then chunks of `step_frames` under nn.scan (a shorter remainder last). Returns the
    concatenated outputs and the final caches. step_frames=None: the whole video in one call."""
    T = x.shape[1]
    if step_frames is None or self.is_initializing() or T <= first_frames:
      return net(x, None, first=True)
    y0, cache = net(x[:, :first_frames], None, first=True)
    rest = x[:, first_frames:]
    n, r = divmod(rest.shape[1], step_frames)
    outs = [y0]
    if n:
      xs = rest[:, :n * step_frames].reshape(x.shape[0], n, step_frames, *x.shape[2:])
      scan = nn.scan(lambda mdl, c, xi: mdl(xi, c, first=False)[::-1],
                     variable_broadcast="params", split_rngs={"params": False}, in_axes=1,
                     out_axes=1)
      cache, ys = scan(net, cache, xs)
      outs.append(ys.reshape(ys.shape[0], -1, *ys.shape[3:]))
    if r:
      y, cache = net(rest[:, n * step_frames:], cache, first=False)
      outs.append(y)
    return jnp.concatenate(outs, axis=1), cache

  def encode(self, video: Array, latent_frames_per_step: int | None = 1) -> Array:
    """video [B, T, H, W, 3] in [-1, 1], T = 1 + 4k, H and W multiples of 8 -> normalised latents
    [B, 1 + k, H/8, W/8, z_dim] float32: the posterior mean, (mu - mean) / std.

    latent_frames_per_step: latent frames per scanned chunk after the first frame (the reference
    uses 1); None encodes the whole video in one pass (fastest, most memory).
    """
    cfg = self.config
    B, T, H, W, C = video.shape
    tf, sf = cfg.temporal_factor, cfg.spatial_factor
    if C != 3 or (T - 1) % tf or H % sf or W % sf:
      raise ValueError(f"video must be [B, 1 + {tf}k, H, W, 3] with H and W multiples of {sf}, "
                       f"got {video.shape}.")
    step = None if latent_frames_per_step is None else tf * int(latent_frames_per_step)
    h, _ = self._chunked(self.encoder, video, 1, step)
    h, _ = layers.causal(self.quant_conv, h, None)
    mu = h[..., :cfg.z_dim].astype(jnp.float32)
    mean, std = self._stats(mu.ndim)
    return (mu - mean) / std

  def _denormalise(self, latents: Array) -> Array:
    cfg = self.config
    if latents.ndim != 5 or latents.shape[-1] != cfg.z_dim:
      raise ValueError(f"latents must be [B, F, h, w, {cfg.z_dim}], got {latents.shape}.")
    mean, std = self._stats(latents.ndim)
    z = latents.astype(jnp.float32) * std + mean
    return layers.causal(self.post_quant_conv, z, None)[0]

  def decode(self, latents: Array, latent_frames_per_step: int | None = 1) -> Array:
    """Normalised latents [B, F, h, w, z_dim] -> video [B, 1 + 4(F - 1), 8h, 8w, 3] float32,
    clamped to [-1, 1].

    latent_frames_per_step: latent frames per scanned chunk after the first (the reference uses
    1); None decodes the whole video in one pass (fastest, most memory).
    """
    x = self._denormalise(latents)
    video, _ = self._chunked(self.decoder, x, 1, latent_frames_per_step)
    return jnp.clip(video.astype(jnp.float32), -1.0, 1.0)

  def init_decode_state(self, batch: int, height: int, width: int) -> DecodeState:
    """The state before a video's first chunk, for latents [batch, k, height, width, z_dim].

    Uses the config only, so it also works on an unbound module: `WanVAE(cfg).init_decode_state`.
    """
    dtype = jnp.dtype(self.config.dtype)
    shapes = decode_cache_shapes(self.config, batch, height, width)
    caches = jax.tree.map(lambda s: jnp.zeros(s, dtype), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    return DecodeState(caches=caches, started=False)

  def decode_chunk(self, state: DecodeState, latents: Array) -> tuple[Array, DecodeState]:
    """Decodes the next chunk of a video.

    Args:
      state: from `init_decode_state` (before the first chunk) or the previous call.
      latents: [B, k, h, w, z_dim] normalised latents, the next k latent frames.

    Returns:
      (frames [B, n, 8h, 8w, 3] float32 in [-1, 1] with n = 4k - 3 for the first chunk and 4k after,
       the new state). Concatenating the frames of all chunks equals `decode` of all the latents.
    """
    B, _, h, w, _ = latents.shape
    want = decode_cache_shapes(self.config, B, h, w)["conv_in"]
    have = tuple(state.caches["conv_in"].shape)
    if have != want:
      raise ValueError(f"the decode state was made for latents [{have[0]}, k, {have[2]}, "
                       f"{have[3]}, {have[4]}], got {latents.shape}.")
    x = self._denormalise(latents)
    frames, caches = self.decoder(x, state.caches if state.started else None,
                                  first=not state.started)
    dtype = jnp.dtype(self.config.dtype)
    caches = jax.tree.map(lambda c: c.astype(dtype), caches)
    return jnp.clip(frames.astype(jnp.float32), -1.0, 1.0), DecodeState(caches, started=True)

  def __call__(self, video: Array, latent_frames_per_step: int | None = None) -> Array:
    """Reconstruction: decode(encode(video)) (also what `init` runs to create every param)."""
    return self.decode(self.encode(video, latent_frames_per_step), latent_frames_per_step)


# ----------------------------------------------------------------------------------------------
# Params without a forward pass.


def _dummy_video(cfg: VAEConfig) -> Array:
  # Two latent frames, so that the temporal convs (which skip the first frame) are created too.
  s = cfg.spatial_factor
  return jnp.zeros((1, 1 + cfg.temporal_factor, s, s, 3), jnp.float32)


def init_params(cfg: VAEConfig, rng: Array) -> Any:
  """Random params (plain arrays in `param_dtype`): kernels normal with variance 1/fan_in, biases
  zero, norm scales one (the module's initializers), drawn from one random stream so that the
  compile stays short (one initializer call per leaf compiles for tens of seconds on a CPU)."""
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree.flatten_with_path(abstract)
  kernels = [l for p, l in leaves if p[-1].key == "kernel"]
  total = sum(int(np.prod(l.shape)) for l in kernels)

  def make(key):
    noise = jax.random.normal(key, (total,), jnp.float32)
    out, offset = [], 0
    for path, leaf in leaves:
      name = path[-1].key
      if name == "kernel":
        n = int(np.prod(leaf.shape))
        fan_in = int(np.prod(leaf.shape[:-1]))
        value = noise[offset:offset + n].reshape(leaf.shape) / np.sqrt(fan_in)
        offset += n
      elif name == "scale":
        value = jnp.ones(leaf.shape)
      else:
        value = jnp.zeros(leaf.shape)
      out.append(value.astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)

  return jax.jit(make)(rng)


def _init_boxed(cfg: VAEConfig, rng: Array) -> Any:
  return WanVAE(cfg).init(rng, _dummy_video(cfg))


def abstract_params(cfg: VAEConfig) -> Any:
  """The param tree as `jax.ShapeDtypeStruct`s; allocates nothing."""
  return jax.tree.map(lambda l: l, _abstract_params(cfg))  # a fresh tree: callers may edit it


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: VAEConfig) -> Any:
  return jax.eval_shape(lambda: nn.unbox(_init_boxed(cfg, jax.random.key(0))["params"]))


def logical_axes(cfg: VAEConfig) -> Any:
  """The param tree with a `jax.sharding.PartitionSpec` of logical axis names at every leaf
  (`vae_in`, `vae_out`, `vae_norm`; no rule maps them by default, so the VAE is replicated)."""
  boxed = jax.eval_shape(lambda: _init_boxed(cfg, jax.random.key(0)))
  return nn.get_partition_spec(boxed)["params"]
