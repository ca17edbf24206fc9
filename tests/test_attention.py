"""The attention dispatch: block-causal as padding equals the dense mask; the registry seam."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.models import attention as attn


def _qkv(b=2, t=12, n=3, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, t, n, d)) for k in ks)


def test_block_causal_padding_equals_dense_mask():
  q, k, v = _qkv()
  dense = attn.block_causal_attention(q, k, v, chunk_tokens=4, impl="xla", as_padding=False)
  padded = attn.block_causal_attention(q, k, v, chunk_tokens=4, impl="xla", as_padding=True)
  np.testing.assert_allclose(padded, dense, atol=1e-6)
  # Chunk 0 ignores everything after it; the last chunk sees all keys.
  np.testing.assert_allclose(dense[:, :4], attn.attention(q[:, :4], k[:, :4], v[:, :4]),
                             atol=1e-6)
  np.testing.assert_allclose(dense[:, 8:], attn.attention(q, k, v)[:, 8:], atol=1e-6)
  with pytest.raises(ValueError, match="whole number"):
    attn.block_causal_attention(q, k, v, chunk_tokens=5)


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
