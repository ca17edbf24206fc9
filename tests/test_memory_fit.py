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


def _load(name, arg=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["asd", "self_forcing", "ode_init"])
def test_real_configs_store_the_teacher_in_bfloat16(name):
  from asd_jax.train.programs import wan_config  # pylint: disable=g-import-not-at-top
  for arg in (None, "teacher=1.3b"):
    c = _load(name, arg)
    cfg = wan_config(c.models.teacher, c.dtype, c.remat)
    assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
    for net in ("student", "critic"):  # trained networks keep float32 master weights
      assert wan_config(c.models[net], c.dtype, c.remat).param_dtype == "float32"


def test_teacher_dtype_reaches_the_programs():
  from asd_jax.train.programs import build_programs  # pylint: disable=g-import-not-at-top
  c = _load("asd", "tiny")
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  for dtype in ("bfloat16", "float32"):
    c.models.teacher.param_dtype = dtype
    progs = build_programs(c, mesh)
    teacher = progs.args["generator"][0]
    kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(teacher)
               if "kernel" in jax.tree_util.keystr(path)]
    assert kernels and {x.dtype for x in kernels} == {jnp.dtype(dtype)}  # (norms stay float32)
    assert {x.dtype for x in jax.tree.leaves(progs.state.generator)} == {jnp.dtype("float32")}


def test_split_microbatches_keeps_each_spread_over_devices():
  from asd_jax.train.steps import split_microbatches  # pylint: disable=g-import-not-at-top
  x = jnp.arange(8 * 3).reshape(8, 3)
  y = split_microbatches(x, 4)
  assert y.shape == (4, 2, 3)
  # Two devices hold rows 0-3 and 4-7: every microbatch takes one row from each.
  np.testing.assert_array_equal(y[:, :, 0] // 3, [[0, 4], [1, 5], [2, 6], [3, 7]])
  with pytest.raises(ValueError, match="microbatches"):
    split_microbatches(x, 3)


def test_accumulate_equals_the_whole_batch():
  from asd_jax.train.steps import accumulate  # pylint: disable=g-import-not-at-top
  params = {"w": jax.random.normal(jax.random.key(0), (5, 3))}
  batch = {"x": jax.random.normal(jax.random.key(1), (8, 5)),
           "y": jax.random.normal(jax.random.key(2), (8, 3))}

  def loss_fn(p, b, key):  # a mean over rows; the key's noise is drawn per microbatch
    del key
    err = b["x"] @ p["w"] - b["y"]
    return jnp.mean(err ** 2), {"err": jnp.mean(jnp.abs(err))}

  key = jax.random.key(3)
  (l1, m1), g1 = accumulate(loss_fn, params, batch, key, 1)
  (l4, m4), g4 = jax.jit(lambda p, b: accumulate(loss_fn, p, b, key, 4))(params, batch)
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  np.testing.assert_allclose(m4["err"], m1["err"], rtol=1e-6)
  np.testing.assert_allclose(g4["w"], g1["w"], rtol=1e-5, atol=1e-7)
  plain = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
  np.testing.assert_array_equal(plain[1]["w"], g1["w"])  # accum = 1 is the plain call


def test_accumulation_steps_from_the_config():
  from asd_jax.train.programs import accum_steps  # pylint: disable=g-import-not-at-top
  c = _load("asd", "tiny")
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  c.batch_size = 8
  assert accum_steps(c, mesh) == 1  # device_batch 0: the whole batch at once
  c.device_batch = 2
  assert accum_steps(c, mesh) == 4
  c.device_batch = 3
  with pytest.raises(ValueError, match="device_batch"):
    accum_steps(c, mesh)


@pytest.mark.parametrize("name", ["asd", "self_forcing", "ode_init"])
def test_real_configs_shard_fully_and_accumulate(name):
  c = _load(name)
  assert tuple(c.mesh_shape) == (1, -1, 1)  # every device on 'fsdp'
  assert c.device_batch == 1 and c.batch_size == 64
  assert c.remat == "full"
  rules = dict(shd.DEFAULT_RULES)
  assert rules["embed"] == "fsdp" and "fsdp" in rules["batch"]
  tiny = _load(name, "tiny")  # tiny runs keep the whole batch at once, data parallel
  assert tiny.device_batch == 0 and tuple(tiny.mesh_shape) == (-1, 1, 1)
