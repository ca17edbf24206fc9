"""The attention dispatch: block-causal by prefixes equals the dense mask; "auto" by platform; the
registry seam."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.models import attention as attn


def _qkv(b=2, t=12, n=3, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, t, n, d)) for k in ks)


@pytest.mark.parametrize("chunk", [4, 5])  # 12 tokens: three whole chunks / a partial last one
def test_block_causal_prefixes_equal_dense_mask(chunk):
  q, k, v = _qkv()
  dense = attn.block_causal_attention(q, k, v, chunk_tokens=chunk, impl="xla", method="dense")
  prefix = attn.block_causal_attention(q, k, v, chunk_tokens=chunk, impl="xla", method="prefix")
  np.testing.assert_allclose(prefix, dense, atol=1e-6)
  # Chunk 0 ignores everything after it; the last chunk sees all keys.
  np.testing.assert_allclose(dense[:, :chunk],
                             attn.attention(q[:, :chunk], k[:, :chunk], v[:, :chunk]), atol=1e-6)
  np.testing.assert_allclose(dense[:, 10:], attn.attention(q, k, v)[:, 10:], atol=1e-6)
  # And it is not the bidirectional result.
  assert float(jnp.abs(dense[:, :chunk] - attn.attention(q, k, v)[:, :chunk]).max()) > 1e-2
  with pytest.raises(ValueError, match="method"):
    attn.block_causal_attention(q, k, v, chunk_tokens=chunk, method="nope")
  with pytest.raises(ValueError, match="splash implementation"):
    attn.block_causal_attention(q, k, v, chunk_tokens=chunk, impl="xla", method="splash")


def test_auto_picks_by_the_platform_compiled_for():
  q, _, _ = _qkv()
  assert attn.target_platform() == "cpu"
  assert attn.resolve("auto", q) == "xla"
  assert attn.resolve("auto", q.astype(jnp.bfloat16)) == "xla"
  targets = pytest.importorskip("asd_jax.targets")
  seen = {}

  def probe(x):
    seen["platform"] = attn.target_platform()
    seen["impl"] = attn.resolve("auto", x)
    seen["masked"] = attn.resolve("auto", x, jnp.ones((1, 1, 12, 12), bool))
    return x

  mesh = jax.make_mesh((1,), ("data",), devices=targets.devices(targets.parse("v5p-8"))[:1])
  with jax.set_mesh(mesh):  # a TPU mesh from this CPU host: what the TPU host would pick
    jax.jit(probe).trace(jax.ShapeDtypeStruct(q.shape, q.dtype))
  assert seen == {"platform": "tpu", "impl": "splash", "masked": "xla"}


def test_kv_lengths_ignore_keys_past_the_length():
  q, k, v = _qkv()
  out = attn.attention(q, k, v, kv_lengths=jnp.array([5, 9], jnp.int32))
  np.testing.assert_allclose(out[0], attn.attention(q[:1], k[:1, :5], v[:1, :5])[0], atol=1e-6)
  np.testing.assert_allclose(out[1], attn.attention(q[1:], k[1:, :9], v[1:, :9])[0], atol=1e-6)


def test_registered_implementation_is_called():
  calls = []

  def fake(q, k, v, *, mask, kv_lengths):
    calls.append((q.shape, mask is None, kv_lengths is None))
    return jnp.zeros_like(q)

  attn.register_attention("fake_kernel", fake)
  q, k, v = _qkv()
  assert float(jnp.abs(attn.attention(q, k, v, impl="fake_kernel")).max()) == 0.0
  assert calls == [(q.shape, True, True)]
  assert "fake_kernel" in attn.available()
  with pytest.raises(ValueError, match="Unknown attention"):
    attn.attention(q, k, v, impl="nope")
  with pytest.raises(ValueError, match="built in"):
    attn.register_attention("xla", fake)
