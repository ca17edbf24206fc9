"""The one attention function every network in asd_jax calls.

`attention(q, k, v, ...)` dispatches to an implementation by name:
- "xla": `jax.nn.dot_product_attention` lowered by XLA (any backend, any dtype). It materialises
  the [B, N, T, S] scores: the reference the kernels are tested against, and the CPU path;
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16);
- "splash": Pallas splash attention (TPU; `asd_jax.models.splash`), run in interpret mode when the
  program is not for a TPU;
- "auto": splash for a TPU, cuDNN for a GPU when the inputs qualify, XLA otherwise;
- any name added with `register_attention` (the seam for a custom kernel).

"auto" decides by the platform the program is compiled for: the devices of the mesh in context
(`jax.set_mesh(mesh)`), else the default backend. A program compiled ahead of time for a TPU or a
GPU from a CPU host (a mesh over `asd_jax.targets` devices) therefore picks what the real host would.

Layout is `[B, T, N, D]` for queries and `[B, S, N, D]` for keys and values, as in
`jax.nn.dot_product_attention`. Masking is given either as a boolean `mask` broadcastable to
`[B, N, T, S]` (True = attend; XLA only: a dense mask is what a flash kernel avoids) or as
`kv_lengths [B]` (keys at positions >= length are ignored), which the kernels apply without
building a mask. Block-causal self-attention has its own entry, `block_causal_attention`, and so
has a chunk's attention to a partly filled KV cache, `cached_attention`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AttentionFn = Callable[..., jax.Array]

_REGISTRY: dict[str, AttentionFn] = {}
_BUILT_IN = ("auto", "xla", "cudnn", "splash")
TENSOR_AXIS = "tensor"


def register_attention(name: str, fn: AttentionFn) -> None:
  """Makes `fn(q, k, v, *, mask, kv_lengths) -> out` selectable as `attention_impl=name`."""
  if name in _BUILT_IN:
    raise ValueError(f"'{name}' is built in and cannot be replaced.")
  _REGISTRY[name] = fn


def available() -> tuple[str, ...]:
  return _BUILT_IN + tuple(sorted(_REGISTRY))


def target_platform() -> str:
  """'tpu', 'gpu' or 'cpu': the platform of the mesh in context, else of the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  platform = None
  if not mesh.empty:
    platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
  platform = (platform or jax.default_backend()).lower()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def _cudnn_applies(q: jax.Array, mask: jax.Array | None) -> bool:
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  head_dim = q.shape[-1]
  # A dense boolean mask makes cuDNN fall off its fast path; XLA is as good there.
  return mask is None and head_dim % 8 == 0 and head_dim <= 128


def resolve(impl: str, q: jax.Array, mask: jax.Array | None = None) -> str:
  """The implementation "auto" picks for these inputs (other names are returned as they are)."""
  if impl != "auto":
    return impl
  platform = target_platform()
  if platform == "tpu" and mask is None:
    return "splash"
  if platform == "gpu" and _cudnn_applies(q, mask):
    return "cudnn"
  return "xla"


def _mesh_specs(mesh, batch: int, heads: int):
  """PartitionSpec axes for (batch, heads) over a mesh: batch over the non-tensor axes that divide
  it (in mesh order), heads over 'tensor' when it divides them."""
  batch_axes, size = [], 1
  for name in mesh.axis_names:
    n = mesh.shape[name]
    if name == TENSOR_AXIS or n == 1:
      continue
    if batch % (size * n) == 0:
      batch_axes.append(name)
      size *= n
  head_axis = None
  if TENSOR_AXIS in mesh.axis_names and mesh.shape[TENSOR_AXIS] > 1 and (
      heads % mesh.shape[TENSOR_AXIS] == 0):
    head_axis = TENSOR_AXIS
  return (tuple(batch_axes) or None), head_axis


def per_shard(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array,
              kv_lengths: jax.Array | None) -> jax.Array:
  """`fn(q, k, v, kv_lengths)` on each device's shard under the mesh in context.

  Kernels that the compiler cannot partition (Mosaic) or partitions only for inputs sharded
  alike (cuDNN's custom partitioner refuses queries, keys and values sharded differently, as GSPMD
  may propagate them inside a rollout) run inside `shard_map` with explicit specs: the batch over
  the mesh axes other than 'tensor' that divide it, the heads over 'tensor' when it divides them,
  the rest replicated (`[B, T, N, D]` layout, `kv_lengths [B]`). Without a mesh, on a one-device
  mesh, or already inside a manual region, `fn` is called as it is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not mesh.are_all_axes_auto:
    return fn(q, k, v, kv_lengths)
  batch_axes, head_axis = _mesh_specs(mesh, q.shape[0], q.shape[2])
  spec = P(batch_axes, None, head_axis, None)
  lengths = kv_lengths if kv_lengths is not None else jnp.zeros((q.shape[0],), jnp.int32)

  def body(qs, ks, vs, ls):
    return fn(qs, ks, vs, ls if kv_lengths is not None else None)

  return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axes)),
                       out_specs=spec, check_vma=False)(q, k, v, lengths)


def _check(impl: str) -> None:
  if impl not in _BUILT_IN and impl not in _REGISTRY:
    raise ValueError(f"Unknown attention implementation '{impl}'; choose one of {available()}.")


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
    impl: "auto", "xla", "cudnn", "splash" or a registered name.

  Returns:
    [B, T, N, D] in q's dtype.
  """
  _check(impl)
  if impl in _REGISTRY:
    return _REGISTRY[impl](q, k, v, mask=mask, kv_lengths=kv_lengths)
  impl = resolve(impl, q, mask)
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
  if impl == "splash":
    if mask is not None:
      raise ValueError("splash attention takes no dense mask; use kv_lengths or "
                       "block_causal_attention, or attention_impl='xla'.")
    from asd_jax.models.splash import splash_attention  # pylint: disable=g-import-not-at-top
    return splash_attention(q, k, v, kv_lengths=kv_lengths)
  if impl == "cudnn" and mask is None:
    return per_shard(lambda q, k, v, lengths: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"), q, k, v, kv_lengths)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=impl)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     kv_lengths: jax.Array, *, granule: int, impl: str = "auto") -> jax.Array:
  """A chunk's queries [B, T, N, D] against a cache [B, S, N, D] whose keys [0, kv_lengths) count.

  Flash kernels skip the keys past the length themselves. XLA's attention would compute a score
  for every key of the cache and mask most of them while the cache fills, so on that path the call
  goes through a `lax.switch` over static key prefixes (multiples of `granule` tokens, the last
  one the whole cache): the branch taken attends to the shortest prefix that holds every valid
  key, and masks the rest of it as before. Same result; while the cache fills, a fraction of the
  score and value work.
  """
  S = k_cache.shape[1]
  if resolve(impl, q) != "xla" or granule >= S:
    return attention(q, k_cache, v_cache, kv_lengths=kv_lengths, impl=impl)
  prefixes = tuple(range(granule, S, granule)) + (S,)

  def branch(prefix):
    return lambda q, k, v, lengths: attention(q, k[:, :prefix], v[:, :prefix],
                                              kv_lengths=lengths, impl=impl)

  longest = jnp.max(kv_lengths)
  index = jnp.sum(jnp.asarray(prefixes[:-1], jnp.int32) < longest)  # first prefix >= longest
  return jax.lax.switch(index, [branch(p) for p in prefixes], q, k_cache, v_cache, kv_lengths)


def block_causal_mask(tokens: int, chunk_tokens: int) -> jax.Array:
  """[1, 1, T, T] bool: a query of chunk c sees the keys of chunks <= c (the last may be partial)."""
  chunk = jnp.arange(tokens) // chunk_tokens
  return (chunk[:, None] >= chunk[None, :])[None, None]


def block_causal_attention(q: jax.Array,
                           k: jax.Array,
                           v: jax.Array,
                           *,
                           chunk_tokens: int,
                           impl: str = "auto",
                           method: str | None = None) -> jax.Array:
  """Self-attention where a query of chunk c sees the keys of chunks <= c.

  q, k, v: [B, T, N, D]; the chunks are `chunk_tokens` long, the last one may be shorter. Three
  equal formulations (`method`):
  - "dense": a [T, T] boolean mask (XLA: simple, but materialises every score and mask);
  - "prefix": chunk c's queries attend to the static key prefix [0, (c + 1) * chunk_tokens), one
    call per chunk: a flash kernel never sees the masked keys (about (n + 1) / 2n of the dense
    work for n chunks) and nothing is copied;
  - "splash": one block-sparse splash kernel (masked key blocks skipped).
  `method=None` picks by implementation: splash -> "splash", xla -> "dense", else "prefix".
  """
  B, T, N, D = q.shape
  if chunk_tokens < 1:
    raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
  _check(impl)
  resolved = resolve(impl, q)
  if method is None:
    method = {"splash": "splash", "xla": "dense"}.get(resolved, "prefix")
  if method == "splash":
    if resolved != "splash":
      raise ValueError(f"method 'splash' needs the splash implementation, not '{resolved}'.")
    from asd_jax.models.splash import splash_attention  # pylint: disable=g-import-not-at-top
    return splash_attention(q, k, v, chunk_tokens=chunk_tokens)
  if method == "dense":
    return attention(q, k, v, mask=block_causal_mask(T, chunk_tokens), impl=impl)
  if method != "prefix":
    raise ValueError(f"method must be 'dense', 'prefix' or 'splash', got '{method}'.")
  outs = []
  for start in range(0, T, chunk_tokens):
    end = min(start + chunk_tokens, T)
    outs.append(attention(q[:, start:end], k[:, :end], v[:, :end], impl=impl))
  return jnp.concatenate(outs, axis=1)
