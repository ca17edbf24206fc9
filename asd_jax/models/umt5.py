"""umT5 encoder (the text encoder of Wan 2.1) in Flax linen.

    cfg = UMT5Config.preset("xxl", dtype="bfloat16")
    hidden = UMT5Encoder(cfg).apply({'params': p}, token_ids, mask)   # [B, L, d_model] float32

The forward follows transformers' `UMT5EncoderModel` and Wan's `T5Encoder` (shared spec WAN.md
section 6):

  x = embedding[ids]                                   (no scaling)
  per layer: x += o(attn(q(n1), k(n1), v(n1)) + bias_l)   n1 = rms_norm1(x)
             x += fc2(fc1(n2) * gelu_tanh(gate(n2)))        n2 = rms_norm2(x)
  hidden = rms_norm(x)

Attention is T5's: no 1/sqrt(d) scaling, an additive relative-position bias that every layer owns
(32 bidirectional log buckets up to distance 128; this per-layer bias is what makes it umT5), and
padded keys (mask == 0) masked out. Padded query positions still get an output; callers trim them.

Precision: T5 RMSNorm, softmax and the residual stream are float32; `UMT5Config.dtype` is the
input dtype of every matmul (q/k/v/o, attention scores and values, FFN), accumulated and returned in
float32. The reference in bfloat16 keeps its residual stream in bfloat16; keeping it in float32 here
only removes rounding.

Parameter layout (the converter maps PyTorch names onto it): kernels are [in, out]; every leaf under
`blocks` has a leading `[num_layers]` axis and the layers run under `nn.scan`.

  token_embedding/embedding [vocab, d_model]
  blocks/norm1/scale, blocks/norm2/scale                     [L, d_model]
  blocks/attn/{q,k,v}/kernel [L, d_model, H*d_kv], blocks/attn/o/kernel [L, H*d_kv, d_model]
  blocks/pos_embedding/embedding                             [L, num_buckets, H]
  blocks/ffn/{gate,fc1}/kernel [L, d_model, d_ff], blocks/ffn/fc2/kernel [L, d_ff, d_model]
  norm/scale                                                 [d_model]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["UMT5Config", "PRESETS", "UMT5Encoder", "relative_position_buckets", "init_params",
           "abstract_params", "logical_axes"]

Array = jax.Array
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Architecture (Hugging Face `UMT5Config` names) and execution settings of the umT5 encoder."""
  vocab_size: int = 256384
  d_model: int = 4096
  d_ff: int = 10240
  num_heads: int = 64
  d_kv: int = 64
  num_layers: int = 24
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  eps: float = 1e-6
  # Execution (not architecture): free to change at load time.
  dtype: str = "float32"  # input dtype of the matmuls: float32 | bfloat16 | float16
  param_dtype: str = "float32"  # dtype of freshly initialised params (restores keep the stored one)
  precision: str | None = None  # lax.Precision of the matmuls; "highest" for fp32 parity on TPU
  scan_layers: bool = True  # False unrolls the layer loop (faster run, slower compile)

  ARCH_FIELDS = ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "eps")

  def __post_init__(self):
    self.validate()

  @property
  def inner_dim(self) -> int:
    """Width of q, k, v (num_heads * d_kv)."""
    return self.num_heads * self.d_kv

  def validate(self) -> None:
    for name in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    nb = self.relative_attention_num_buckets
    if nb < 4 or nb % 4:
      raise ValueError(f"relative_attention_num_buckets must be a multiple of 4 (>= 4) for "
                       f"bidirectional buckets, got {nb}.")
    if self.relative_attention_max_distance <= nb // 4:
      raise ValueError(f"relative_attention_max_distance ({self.relative_attention_max_distance}) "
                       f"must exceed num_buckets // 4 = {nb // 4}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}.")

  def replace(self, **changes) -> "UMT5Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UMT5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown UMT5Config fields {unknown}; known: {sorted(names)}.")
    return cls(**d)

  @classmethod
  def preset(cls, name: str, **overrides) -> "UMT5Config":
    """'xxl' (Wan 2.1's umT5-XXL encoder, ~5.7B params) or 'tiny' (for tests)."""
    key = name.lower().replace("umt5", "").replace("-", "").replace("_", "").strip()
    if key not in PRESETS:
      raise ValueError(f"Unknown umT5 preset '{name}'; choose one of {sorted(PRESETS)}.")
    return cls(**{**PRESETS[key], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "xxl": dict(vocab_size=256384, d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=24),
    "tiny": dict(vocab_size=256, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2),
}


# ----------------------------------------------------------------------------------------------
# Relative positions.


@functools.lru_cache(maxsize=32)
def _bucket_table(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
  rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half  # keys after the query use the upper half
  rel = np.abs(rel)
  max_exact = half // 2
  # float32 as the reference computes it: truncation at the bucket edges depends on the rounding.
  ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
  ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = np.minimum(max_exact + ratio.astype(np.int64), half - 1)
  table = (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)
  table.setflags(write=False)
  return table


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 buckets of (key position - query position): int32 [q_len, k_len].

  Half the buckets are for keys at or before the query, half for keys after it; within a half,
  distances below num_buckets // 4 get a bucket each and larger ones share log-spaced buckets up to
  `max_distance` (everything further falls in the last one).
  """
  return _bucket_table(int(q_len), int(k_len), int(num_buckets), int(max_distance))


# ----------------------------------------------------------------------------------------------
# Layers.


def _init(axes: tuple[str | None, ...], base):
  return nn.with_logical_partitioning(base, axes)


def _lead(v: Array, ndim: int) -> Array:
  """Reshapes a vector to broadcast along the last axis of an ndim array (no rank promotion)."""
  return v.reshape((1,) * (ndim - 1) + v.shape[-1:])


class RMSNorm(nn.Module):
  """T5 LayerNorm: x / rms(x) * scale, no mean subtraction, no bias; float32 in and out."""
  eps: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", _init(("embed",), nn.initializers.ones), (x.shape[-1],),
                       jnp.float32)
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return y * _lead(scale.astype(jnp.float32), y.ndim)


class Linear(nn.Module):
  """Linear layer without bias; kernel [in, out] (a torch weight transposed). Returns float32."""
  features: int
  axes: tuple[str | None, str | None]
  std: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _init(self.axes, nn.initializers.normal(self.std)),
                        (x.shape[-1], self.features), self.param_dtype)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision,
                   preferred_element_type=jnp.float32)


class Embedding(nn.Module):
  """A lookup table `embedding` [num, features]; returns float32 rows."""
  num: int
  features: int
  axes: tuple[str | None, str | None]
  std: float
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", _init(self.axes, nn.initializers.normal(self.std)),
                                (self.num, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0).astype(jnp.float32)


class Attention(nn.Module):
  """T5 self-attention: unscaled q.k plus an additive [H, L, L] bias, padded keys masked."""
  cfg: UMT5Config

  @nn.compact
  def __call__(self, x: Array, key_mask: Array, bias_HLL: Array) -> Array:
    cfg = self.cfg
    cdt = jnp.dtype(cfg.dtype)
    B, L, D = x.shape
    H, K = cfg.num_heads, cfg.d_kv
    linear = functools.partial(Linear, dtype=cdt, param_dtype=jnp.dtype(cfg.param_dtype),
                               precision=cfg.precision)
    # Wan's initialisation scales (T5 has no 1/sqrt(d) in the scores, so q carries it).
    q = linear(cfg.inner_dim, ("embed", "qkv"), (D * K)**-0.5, name="q")(x)
    k = linear(cfg.inner_dim, ("embed", "qkv"), D**-0.5, name="k")(x)
    v = linear(cfg.inner_dim, ("embed", "qkv"), D**-0.5, name="v")(x)
    q_BLHK, k_BLHK, v_BLHK = (t.reshape(B, L, H, K).astype(cdt) for t in (q, k, v))
    scores = jnp.einsum("bqhk,bshk->bhqs", q_BLHK, k_BLHK, precision=cfg.precision,
                        preferred_element_type=jnp.float32)
    scores = scores + bias_HLL[None]
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(cdt), v_BLHK, precision=cfg.precision,
                     preferred_element_type=jnp.float32)
    return linear(D, ("qkv", "embed"), cfg.inner_dim**-0.5, name="o")(out.reshape(B, L, H * K))


class FeedForward(nn.Module):
  """fc2(fc1(x) * gelu_tanh(gate(x))); the product is formed in float32."""
  cfg: UMT5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    linear = functools.partial(Linear, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision)
    D, F = cfg.d_model, cfg.d_ff
    g = jax.nn.gelu(linear(F, ("embed", "mlp"), D**-0.5, name="gate")(x), approximate=True)
    h = linear(F, ("embed", "mlp"), D**-0.5, name="fc1")(x) * g
    return linear(D, ("mlp", "embed"), F**-0.5, name="fc2")(h)


class Block(nn.Module):
  """One encoder layer: pre-norm self-attention with this layer's own position bias, then the
  pre-norm gated FFN. Written for `nn.scan`: carry x [B, L, d_model] float32; returns (x, None)."""
  cfg: UMT5Config

  @nn.compact
  def __call__(self, x: Array, key_mask: Array, buckets: Array):
    cfg = self.cfg
    H = cfg.num_heads
    nb = cfg.relative_attention_num_buckets
    pos = Embedding(nb, H, (None, None), (2 * nb * H)**-0.5, jnp.dtype(cfg.param_dtype),
                    name="pos_embedding")
    bias_HLL = jnp.transpose(pos(buckets), (2, 0, 1))  # [H, Lq, Lk] float32
    x = x + Attention(cfg, name="attn")(RMSNorm(cfg.eps, name="norm1")(x), key_mask, bias_HLL)
    x = x + FeedForward(cfg, name="ffn")(RMSNorm(cfg.eps, name="norm2")(x))
    return x, None


class UMT5Encoder(nn.Module):
  """umT5 encoder. See the module docstring for the maths, precision and param layout."""
  config: UMT5Config

  @nn.compact
  def __call__(self, token_ids: Array, mask: Array | None = None) -> Array:
    """Encodes token ids.

    Args:
      token_ids: [B, L] integer token ids in [0, vocab_size) (ids outside are not checked here;
        `jnp.take` clamps them).
      mask: [B, L] (bool or 0/1), 1 for real tokens, 0 for padding; None means no padding. Padded
        keys are masked out of every attention; positions are counted from the start of the row,
        so pad on the right.

    Returns:
      hidden [B, L, d_model] float32: the encoder output after the final norm.
    """
    cfg = self.config
    if token_ids.ndim != 2:
      raise ValueError(f"token_ids must be [B, L], got shape {token_ids.shape}.")
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
      raise ValueError(f"token_ids must be integers, got dtype {token_ids.dtype}.")
    B, L = token_ids.shape
    if mask is None:
      key_mask = jnp.ones((B, L), bool)
    else:
      if tuple(mask.shape) != (B, L):
        raise ValueError(f"mask must be [B, L] = {[B, L]} like token_ids, got {list(mask.shape)}.")
      key_mask = mask.astype(bool)
    x = Embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), 1.0,
                  jnp.dtype(cfg.param_dtype), name="token_embedding")(token_ids)
    buckets = jnp.asarray(relative_position_buckets(L, L, cfg.relative_attention_num_buckets,
                                                    cfg.relative_attention_max_distance))
    stack = nn.scan(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=1 if cfg.scan_layers else cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(cfg, name="blocks")(x, key_mask, buckets)
    return RMSNorm(cfg.eps, name="norm")(x)


# ----------------------------------------------------------------------------------------------
# Params without a forward pass.


def _dummy_inputs() -> tuple[Array, Array]:
  return jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)


def init_params(cfg: UMT5Config, rng: Array) -> Any:
  """Random params (plain arrays; `param_dtype`, with norm scales float32)."""
  return nn.unbox(UMT5Encoder(cfg).init(rng, *_dummy_inputs())["params"])


def abstract_params(cfg: UMT5Config) -> Any:
  """The param tree as `jax.ShapeDtypeStruct`s; allocates nothing."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logical_axes(cfg: UMT5Config) -> Any:
  """The param tree with a `jax.sharding.PartitionSpec` of logical axis names at every leaf."""
  boxed = jax.eval_shape(lambda: UMT5Encoder(cfg).init(jax.random.key(0), *_dummy_inputs()))
  return nn.get_partition_spec(boxed)["params"]
