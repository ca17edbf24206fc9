"""The one attention function every network in asd_jax calls.

`attention(q, k, v, ...)` dispatches to an implementation by name:
- "xla": `jax.nn.dot_product_attention` lowered by XLA (any backend, any dtype);
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16);
- "auto": cuDNN on a GPU when the inputs qualify, XLA otherwise;
- any name added with `register_attention` (the seam for TPU splash attention or a custom kernel).

Layout is `[B, T, N, D]` for queries and `[B, S, N, D]` for keys and values, as in
`jax.nn.dot_product_attention`. Masking is given either as a boolean `mask` broadcastable to
`[B, N, T, S]` (True = attend) or as `kv_lengths [B]` (keys at positions >= length are ignored); the
second form lets flash kernels skip the padded keys instead of computing and masking them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]

_REGISTRY: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
  """Makes `fn(q, k, v, *, mask, kv_lengths) -> out` selectable as `attention_impl=name`."""
  if name in ("xla", "cudnn", "auto"):
    raise ValueError(f"'{name}' is built in and cannot be replaced.")
  _REGISTRY[name] = fn


def available() -> tuple[str, ...]:
  return ("auto", "xla", "cudnn") + tuple(sorted(_REGISTRY))


def _cudnn_applies(q: jax.Array, mask: jax.Array | None) -> bool:
  if jax.default_backend() != "gpu":
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  head_dim = q.shape[-1]
  # A dense boolean mask makes cuDNN fall off its fast path; XLA is as good there.
  return mask is None and head_dim % 8 == 0 and head_dim <= 128


def resolve(impl: str, q: jax.Array, mask: jax.Array | None = None) -> str:
  """The implementation "auto" picks for these inputs (other names are returned as they are)."""
  if impl == "auto":
    return "cudnn" if _cudnn_applies(q, mask) else "xla"
  return impl


def attention(q: jax.Array,
              k: jax.Array,
              v: jax.Array,
              *,
              mask: jax.Array | None = None,
              kv_lengths: jax.Array | None = None,
              impl: str = "auto") -> jax.Array:
  """Scaled dot-product attention with scale 1/sqrt(D).

  Args:
    q: [B, T, N, D] queries.
    k, v: [B, S, N, D] keys and values (same dtype as q).
    mask: optional bool, broadcastable to [B, N, T, S]; True where a query may attend.
    kv_lengths: optional int32 [B]; only keys [0, length) are attended.
    impl: "auto", "xla", "cudnn" or a registered name.

  Returns:
    [B, T, N, D] in q's dtype.
  """
  if impl in _REGISTRY:
    return _REGISTRY[impl](q, k, v, mask=mask, kv_lengths=kv_lengths)
  impl = resolve(impl, q, mask)
  if impl not in ("xla", "cudnn"):
    raise ValueError(f"Unknown attention implementation '{impl}'; choose one of {available()}.")
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=impl)


def block_causal_attention(q: jax.Array,
                           k: jax.Array,
                           v: jax.Array,
                           *,
                           chunk_tokens: int,
                           impl: str = "auto",
                           as_padding: bool | None = None) -> jax.Array:
  """Self-attention where a query of chunk c sees the keys of chunks <= c.

  q, k, v: [B, T, N, D] with T a multiple of `chunk_tokens`. Two equal formulations:
  - a dense [T, T] boolean mask (XLA: simple, but materialises every score);
  - "as padding": every query chunk becomes its own batch row that attends to the key prefix
    [0, (c + 1) * chunk_tokens) through `kv_lengths`, so a flash kernel skips the masked blocks
    (about (n + 1) / 2n of the dense work for n chunks) and never builds the mask.
  `as_padding=None` uses padding when the resolved implementation is not XLA.
  """
  B, T, N, D = q.shape
  if T % chunk_tokens:
    raise ValueError(f"{T} tokens are not a whole number of {chunk_tokens}-token chunks.")
  n = T // chunk_tokens
  if as_padding is None:
    as_padding = resolve(impl, q) != "xla"
  if not as_padding:
    chunk = jnp.arange(T) // chunk_tokens
    mask = (chunk[:, None] >= chunk[None, :])[None, None]
    return attention(q, k, v, mask=mask, impl=impl)
  qc = q.reshape(B * n, chunk_tokens, N, D)
  kc = jnp.broadcast_to(k[:, None], (B, n, T, N, D)).reshape(B * n, T, N, D)
  vc = jnp.broadcast_to(v[:, None], (B, n, T, N, D)).reshape(B * n, T, N, D)
  lengths = jnp.tile((jnp.arange(n, dtype=jnp.int32) + 1) * chunk_tokens, B)
  return attention(qc, kc, vc, kv_lengths=lengths, impl=impl).reshape(B, T, N, D)
