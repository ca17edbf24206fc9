"""What makes the real configs fit their accelerators: AdamW without a first moment when b1 = 0,
the frozen teacher's storage dtype, the real configs' meshes, batches and remat policies."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from asd_jax.train import sharding as shd
from asd_jax.train import state as st


def _tree(key, scale=1.0):
  k1, k2, k3 = jax.random.split(key, 3)
  normal = lambda k, shape: scale * jax.random.normal(k, shape)
  return {"a": normal(k1, (7, 5)), "b": {"c": normal(k2, (3,)), "d": normal(k3, (2, 4, 6))}}


@pytest.mark.parametrize("clip_norm", [10.0, 0.5])
def test_adamw_without_first_moment_equals_optax(clip_norm):
  kw = dict(b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.01)
  ours = st.make_optimizer(2e-3, clip_norm=clip_norm, **kw)
  ref = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(2e-3, **kw))
  params = _tree(jax.random.key(0))
  s_ours, s_ref = ours.init(params), ref.init(params)
  p_ours = p_ref = params
  for i in range(6):
    grads = _tree(jax.random.key(100 + i), scale=10.0 ** (i % 3 - 1))
    u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, p_ours)
    u_ref, s_ref = jax.jit(ref.update)(grads, s_ref, p_ref)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The second moment and the count are the same; the first moment is not stored.
  adam_ref = s_ref[1][0]
  adam_ours = s_ours[1][0]
  assert not hasattr(adam_ours, "mu")
  assert int(adam_ours.count) == int(adam_ref.count) == 6
  for a, b in zip(jax.tree.leaves(adam_ours.nu), jax.tree.leaves(adam_ref.nu)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adamw_state_bytes_and_beta1_kept():
  params = _tree(jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(params))
  count = lambda tx: sum(x.size for x in jax.tree.leaves(tx.init(params)))
  assert count(st.make_optimizer(1e-3, b1=0.0)) == n + 1  # nu + the step count
  assert count(st.make_optimizer(1e-3, b1=0.9)) == 2 * n + 1  # mu + nu + the step count


def test_opt_state_logical_without_first_moment():
  params = _tree(jax.random.key(0))
  logical = {"a": P("embed", "mlp"), "b": {"c": P(None), "d": P(None, "embed", None)}}
  tx = st.make_optimizer(1e-3)
  state = jax.eval_shape(tx.init, params)
  spec = shd.opt_state_logical(tx, state, logical)
  adam = spec[1][0]
  assert adam.count == P()
  assert adam.nu == logical

