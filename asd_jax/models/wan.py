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
(fully unrolled when `scan_layers=False`). For inference, `split_layers(params)` turns `blocks` into
a tuple of per-layer trees, which every call below also takes (faster with unrolled layers: no
weight slice is copied out per forward).

Calls:
  module.apply({'params': p}, x, t, context) -> v                       # bidirectional
  module.apply({'params': p}, x, t, context, causal=True) -> v          # block-causal, no cache
  module.apply({'params': p}, x, t, context, taps=(12, 21, 29)) -> (v, hidden [3, B, T, dim])
  cache = module.apply({'params': p}, context, batch..., method='init_cache')
  v, cache = module.apply({'params': p}, x_chunk, t, cache, frame_offset, method='forward_chunk')
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from asd_jax.models.wan_config import PRESETS, REMAT_POLICIES, WanConfig
from asd_jax.models.wan_layers import (Block, Dense, Head, MLP, PatchEmbed, rope_cos_sin,
                                      sinusoidal_embedding, write_chunk)

__all__ = ["WanConfig", "PRESETS", "KVCache", "WanModel", "init_params", "abstract_params",
           "logical_axes", "split_layers", "stack_layers"]

Array = jax.Array

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
# The model.


class WanModel(nn.Module):
  """Wan 2.1 DiT. See the module docstring for the calls and shapes."""
  config: WanConfig

  def _blocks(self, mode: str, taps: tuple[int, ...] = (), sink_frames: int = 0,
              chunk_tokens: int = 0):
    """The layer stack: `blocks(carry, e0, rope, ctx, attn_args, xs) -> (carry, ys)`.

    xs and ys carry a leading [num_layers] axis. With stacked params (the layout params are made,
    converted and stored in) the blocks run under `nn.scan`; with per-layer params (a tuple, see
    `split_layers`) they run one after the other, each on its own arrays.
    """
    cfg = self.config
    block = Block
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    if self.has_variable("params", "blocks"):
      layers = self.get_variable("params", "blocks")
      if isinstance(layers, (tuple, list)):
        return functools.partial(_run_layers, block(cfg, mode=mode, taps=taps,
                                                    sink_frames=sink_frames,
                                                    chunk_tokens=chunk_tokens, parent=None),
                                 tuple(layers))
    stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        unroll=1 if cfg.scan_layers else cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack(cfg, mode=mode, taps=taps, sink_frames=sink_frames, chunk_tokens=chunk_tokens,
                 name="blocks")

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
               frame_mask: Array | None = None,
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
      frame_mask: optional bool [F', F'] over patched frames (True = query frame may attend to key
        frame), for any other frame-level pattern; exclusive with `causal`.
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
    attn_args, chunk_tokens = {}, 0
    if causal and frame_mask is not None:
      raise ValueError("pass either causal=True or frame_mask, not both.")
    if causal:  # a partial last chunk is allowed; flash kernels skip the masked blocks
      chunk_tokens = self._chunk_tokens_frames() * S
    elif frame_mask is not None:
      if frame_mask.shape != (grid[0], grid[0]):
        raise ValueError(f"frame_mask must be [{grid[0]}, {grid[0]}], got {frame_mask.shape}.")
      token_mask = jnp.repeat(jnp.repeat(frame_mask.astype(bool), S, axis=0), S, axis=1)
      attn_args["mask"] = token_mask[None, None]
    rope = rope_cos_sin(cfg, *grid)
    taps_buf = jnp.zeros((len(taps),) + tokens.shape, jnp.float32) if taps else None
    xs = {"index": jnp.arange(cfg.num_layers)}
    blocks = self._blocks("full", taps, chunk_tokens=chunk_tokens)
    (h, taps_buf), _ = blocks((tokens, taps_buf), e0, rope, ctx, attn_args, xs)
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
    k_cache, v_cache = write_chunk(cache.k_LBSND, cache.v_LBSND, kv["k"], kv["v"], frame_offset,
                                   grid[0], S, cache.sink_frames)
    return v, cache.replace(k_LBSND=k_cache, v_LBSND=v_cache)

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


def _run_layers(block: nn.Module, layers: tuple[Any, ...], carry, e0, rope, ctx, attn_args, xs):
  """The layer stack over per-layer params: block i runs on layers[i] and xs[i]; ys stacked."""
  ys = []
  for i, layer_params in enumerate(layers):
    xs_i = jax.tree_util.tree_map(lambda a, i=i: a[i], xs)
    carry, y = block.apply({"params": layer_params}, carry, e0, rope, ctx, attn_args, xs_i)
    ys.append(y)
  return carry, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)


def split_layers(params: Any) -> Any:
  """Params with the stacked blocks ([num_layers, ...] leaves) as a tuple of per-layer trees.

  Both layouts run the same model with the same numerics. The per-layer one is for inference with
  unrolled layers (`scan_layers=False`): each block reads its own weights, where a block of the
  stacked layout reads a slice of every stacked weight, which XLA copies out on every forward
  (15-19% of a forward at the 1.3B width on a 2-core CPU). Split once, outside the jitted function,
  and pass the result.
  Training and checkpoints keep the stacked layout (`stack_layers` undoes this).
  """
  blocks = params["blocks"]
  if isinstance(blocks, (tuple, list)):
    return params
  num_layers = jax.tree_util.tree_leaves(blocks)[0].shape[0]
  layers = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], blocks) for i in range(num_layers))
  return {**params, "blocks": layers}


def stack_layers(params: Any) -> Any:
  """Undoes `split_layers`: per-layer block params back to the stacked layout."""
  blocks = params["blocks"]
  if not isinstance(blocks, (tuple, list)):
    return params
  return {**params, "blocks": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)}


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
