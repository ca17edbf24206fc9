"""TPU flash attention for the Wan DiT: Pallas splash attention with static block-sparse masks.

Every attention the DiT runs goes through `splash_attention(q, k, v, ...)`:
- bidirectional self-attention and cross-attention to the text: no mask;
- block-causal self-attention (`chunk_tokens > 0`): a query of chunk c sees the keys of chunks
  <= c. The mask is static and block-sparse: key blocks wholly after the query's chunk are skipped
  by the kernel (never loaded, never computed), blocks wholly inside it run unmasked, and only the
  few blocks that straddle a chunk boundary load a mask tile;
- the cached chunk of `forward_chunk` (`kv_lengths`): the queries of one chunk against the KV cache,
  whose valid length is only known at run time (the sampler's frame offset is traced). The keys
  past the length get another segment id than the queries, so the kernel masks them in registers,
  and the key blocks past the longest row are skipped (their block table entries are made at run
  time from the length): a cache filled to a third costs a third. Nothing of size [T, S] is built.

Sequences are padded up to the kernel's block size (32,760 tokens -> 32,768): padded keys are
outside the static mask (their blocks are skipped, their columns masked) and padded queries are
cut from the output, so results do not change. Scores never exist in memory: the kernel keeps a
running max and sum per query block (online softmax), in float32.

Mosaic kernels are not partitioned by the compiler, so under a mesh (`jax.set_mesh`) the kernel runs
inside `shard_map`: the batch is split over the mesh axes other than 'tensor' that divide it, the
heads over 'tensor' when it divides them, and the rest is replicated. On a machine without a TPU
the same kernel runs in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from asd_jax.models.attention import per_shard, target_platform

__all__ = ["splash_attention", "pick_block", "PrefixChunkMask", "limit_kv_blocks"]

# Block sizes tried for a sequence, largest first; the one that pads least wins (ties: the larger).
BLOCK_CHOICES = (512, 256, 128)


def _round_up(n: int, b: int) -> int:
  return -(-n // b) * b


def pick_block(length: int) -> int:
  """The kernel block for a sequence of `length` tokens: the least padding, then the largest."""
  return min(BLOCK_CHOICES, key=lambda b: (_round_up(length, b), -b))


class PrefixChunkMask(sm.Mask):
  """Static [Tq, Tk] mask: query q sees key k iff k < kv_valid and, when chunked,
  k // chunk_tokens <= q // chunk_tokens.

  Not a computable mask on purpose: the kernel loads the few partial tiles (those on a chunk or
  padding boundary) instead of evaluating an integer division per element on the vector units.
  """

  def __init__(self, shape: tuple[int, int], kv_valid: int, chunk_tokens: int = 0):
    self._shape = (int(shape[0]), int(shape[1]))
    self.kv_valid = int(kv_valid)
    self.chunk_tokens = int(chunk_tokens)

  @property
  def shape(self) -> tuple[int, int]:
    return self._shape

  def __getitem__(self, idx) -> np.ndarray:
    q_slice, kv_slice = idx
    rows = np.arange(self._shape[0])[q_slice]
    cols = np.arange(self._shape[1])[kv_slice]
    ok = np.broadcast_to(cols[None, :] < self.kv_valid, (rows.size, cols.size))
    if self.chunk_tokens:
      ok = ok & (cols[None, :] // self.chunk_tokens <= rows[:, None] // self.chunk_tokens)
    return ok

  def _key(self):
    return (self._shape, self.kv_valid, self.chunk_tokens)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, PrefixChunkMask) and self._key() == other._key()

  def __hash__(self) -> int:
    return hash((PrefixChunkMask,) + self._key())


def _kernel(heads: int, q_len: int, kv_len: int, kv_valid: int, chunk_tokens: int,
            block_q: int, block_kv: int, interpret: bool):
  mask = sm.MultiHeadMask([PrefixChunkMask((q_len, kv_len), kv_valid, chunk_tokens)] * heads)
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, use_fused_bwd_kernel=True)
  # Built at every trace (the kernel holds arrays); the block tables behind it are computed once
  # per mask by the library's own cache of processed masks.
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def limit_kv_blocks(kernel: sk.SplashAttentionKernel, kv_length: jax.Array,
                    block_kv: int) -> sk.SplashAttentionKernel:
  """The kernel with the key blocks from `kv_length` (traced) on skipped in its forward pass.

  The static block tables say which blocks run; here every block that holds no key below the
  length is marked empty and points its prefetch at the last live block, so the kernel neither
  loads nor computes it (a KV cache filled to a third costs a third). Element-level masking
  within the last live block is left to the caller (segment ids).
  """
  info = kernel.fwd_mask_info
  blocks = info.block_mask.shape[-1]
  live_count = jnp.clip((kv_length + block_kv - 1) // block_kv, 1, blocks).astype(jnp.int32)
  live = jnp.arange(blocks, dtype=jnp.int32) < live_count  # [kv blocks]

  def clamp(table):  # entries of dead blocks repeat the last live block's
    last = jax.lax.dynamic_slice_in_dim(table, live_count - 1, 1, axis=-1)
    return jnp.where(live, table, last).astype(table.dtype)

  info = info._replace(
      block_mask=jnp.where(live, info.block_mask, 0).astype(info.block_mask.dtype),
      data_next=clamp(info.data_next),
      mask_next=None if info.mask_next is None else clamp(info.mask_next))
  return sk.SplashAttentionKernel(info, kernel.dq_mask_info, kernel.dkv_mask_info,
                                  **kernel.kwargs)


def _local(q, k, v, kv_lengths, *, chunk_tokens: int, interpret: bool):
  """The kernel on unsharded (or per-shard) arrays: q [B, T, N, D], k, v [B, S, N, D]."""
  B, T, N, D = q.shape
  S = k.shape[1]
  block_q, block_kv = pick_block(T), pick_block(S)
  Tp, Sp = _round_up(T, block_q), _round_up(S, block_kv)
  if chunk_tokens and T != S:
    raise ValueError("block-causal splash attention needs queries and keys of one sequence.")
  if chunk_tokens:  # one sequence: pad both to the same length and block
    block_q = block_kv = min(block_q, block_kv)
    Tp = Sp = _round_up(T, block_q)
  kernel = _kernel(N, Tp, Sp, S, chunk_tokens, block_q, block_kv, interpret)
  scale = 1.0 / math.sqrt(D)
  # [B, T, N, D] -> [B, N, Tp, D]; queries pre-scaled (the kernel does not scale).
  qh = jnp.pad((q * jnp.asarray(scale, q.dtype)).swapaxes(1, 2), ((0, 0), (0, 0), (0, Tp - T),
                                                                  (0, 0)))
  kh = jnp.pad(k.swapaxes(1, 2), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  vh = jnp.pad(v.swapaxes(1, 2), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  if kv_lengths is None:
    out = jax.vmap(kernel)(qh, kh, vh)
  else:
    # Key blocks past the longest row are skipped; within it, keys past each row's length get
    # segment 1, queries segment 0: masked in the kernel, per batch row.
    kernel = limit_kv_blocks(kernel, jnp.max(kv_lengths), block_kv)
    q_seg = jnp.zeros((B, Tp), jnp.int32)
    kv_seg = (jnp.arange(Sp, dtype=jnp.int32)[None, :]
              >= kv_lengths.astype(jnp.int32)[:, None]).astype(jnp.int32)
    out = jax.vmap(lambda a, b, c, sq, skv: kernel(a, b, c, sk.SegmentIds(sq, skv)))(
        qh, kh, vh, q_seg, kv_seg)
  return out[:, :, :T].swapaxes(1, 2).astype(q.dtype)


def splash_attention(q: jax.Array,
                     k: jax.Array,
                     v: jax.Array,
                     *,
                     kv_lengths: jax.Array | None = None,
                     chunk_tokens: int = 0,
                     interpret: bool | None = None) -> jax.Array:
  """Scaled dot-product attention (scale 1/sqrt(D)) with the splash kernel.

  Args:
    q: [B, T, N, D] queries; k, v: [B, S, N, D].
    kv_lengths: optional int [B]; only keys [0, length) are attended (may be traced).
    chunk_tokens: > 0 for block-causal self-attention over chunks of this many tokens (T == S;
      a partial last chunk is allowed).
    interpret: run the kernel in Pallas interpret mode; default: when the program is not for a TPU.

  Returns:
    [B, T, N, D] in q's dtype.
  """
  if interpret is None:
    interpret = target_platform() != "tpu"
  run = functools.partial(_local, chunk_tokens=int(chunk_tokens), interpret=bool(interpret))
  return per_shard(run, q, k, v, kv_lengths)
