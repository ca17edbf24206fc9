"""Checks of asd_jax.train.sharding / checkpoint on 8 fake CPU devices.

Run by tests/test_train_infra.py in a subprocess (the device count must be set before JAX starts):
  python tests/train_infra_multidevice.py CHECKPOINT_DIR
Prints "PASS <name>" per check and exits non-zero on the first failure.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           # Compile fast: these checks time compiles, not kernels.
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false"
                           " --xla_cpu_parallel_codegen_split_count=1")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from asd_jax.models import wan  # noqa: E402
from asd_jax.train import checkpoint, sharding  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

RULES = {"batch": ("data", "fsdp"), "embed": "fsdp", "qkv": "tensor", "heads": "tensor",
         "mlp": "tensor"}
CFG = wan.WanConfig.preset("tiny")
KEY = jax.random.key(0)


def is_spec(x):
  return isinstance(x, P)


def expected_spec(logical: P) -> P:
  out = [RULES.get(n) for n in logical]
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def assert_equal_trees(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert x.dtype == y.dtype, (path, x.dtype, y.dtype)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def check_make_mesh():
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert sharding.make_mesh((2, 4, 1)).axis_types == (jax.sharding.AxisType.Auto,) * 3
  for bad in [(3, 1, 1), (-1, -1, 1), (-1, 3, 1), (8, 1)]:
    try:
      sharding.make_mesh(bad)
    except ValueError as e:
      assert "mesh_shape" in str(e), e
    else:
      raise AssertionError(f"make_mesh({bad}) did not raise")


def check_wan_init(reference):
  """Returns the params made on the (2, 4, 1) mesh."""
  logical = wan.logical_axes(CFG)
  made = {}
  for shape in [(8, 1, 1), (2, 4, 1), (1, 4, 2)]:
    mesh = sharding.make_mesh(shape)
    params = sharding.shard_init(lambda k: wan.init_params(CFG, k), mesh,
                                 lambda _: wan.logical_axes(CFG), args=(KEY,))
    for (path, x), spec in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(logical, is_leaf=is_spec)):
      assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
      assert x.sharding.spec == expected_spec(spec), (shape, jax.tree_util.keystr(path),
                                                      x.sharding.spec, spec)
    q = params["blocks"]["self_attn"]["q"]["kernel"]  # [layers, embed, qkv] = [2, 48, 48]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 48 // shape[1], 48 // shape[2])
    assert params["time_projection"]["kernel"].sharding.spec == P("fsdp")  # 'modulation': None
    assert_equal_trees(params, reference)
    made[shape] = params
    print("PASS wan_init", shape, flush=True)
  return made[(2, 4, 1)]


def check_jit_step(reference):
  """Sharded params + batch-sharded input through jit with in/out shardings == unsharded."""
  mesh = sharding.make_mesh((2, 4, 1))
  abstract = sharding.abstract_sharded(lambda k: wan.init_params(CFG, k), mesh,
                                       lambda _: wan.logical_axes(CFG), args=(KEY,))
  p_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  params = jax.device_put(reference, p_shardings)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 1, 4, 4, 16), np.float32)
  t = np.full((8,), 500.0, np.float32)
  ctx = rng.standard_normal((8, 3, CFG.text_dim), np.float32)
  batch = sharding.global_batch({"x": x, "t": t, "ctx": ctx}, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp")) == sharding.batch_sharding(mesh).spec
  assert batch["x"].addressable_shards[0].data.shape == (1, 1, 4, 4, 16)
  module = wan.WanModel(CFG)

  def step(p, b):
    v = module.apply({"params": p}, b["x"], b["t"], b["ctx"])
    loss = jnp.mean(jnp.square(v))
    return jax.tree.map(lambda w: w * 0.5, p), loss, v

  bs = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  f = jax.jit(step, in_shardings=(p_shardings, bs), out_shardings=(p_shardings, replicated, bs))
  with jax.set_mesh(mesh):
    new_p, loss, v = f(params, batch)
  v_ref = module.apply({"params": reference}, x, t, ctx)
  np.testing.assert_allclose(np.asarray(v), np.asarray(v_ref), rtol=1e-4, atol=1e-5)
  assert new_p["blocks"]["ffn"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert v.sharding.spec == bs.spec and np.isfinite(float(loss))
  print("PASS jit_step", flush=True)


def check_rules():
  mesh = sharding.make_mesh((1, 4, 2))
  # 6 is not divisible by fsdp=4 and 5 not by tensor=2: those dimensions are replicated.
  shapes = {"a": jax.ShapeDtypeStruct((6, 5), jnp.float32),
            "b": jax.ShapeDtypeStruct((8, 6), jnp.float32),
            "c": jax.ShapeDtypeStruct((8, 6), jnp.float32),
            "opt": {"count": jax.ShapeDtypeStruct((), jnp.int32)}}
  logical = {"a": P("embed", "mlp"), "b": P("embed", "mlp"), "c": P("embed", "unknown_name"),
             "opt": None}
  out = sharding.logical_to_shardings(logical, mesh, sharding.DEFAULT_RULES, shapes)
  assert out["a"].spec == P(), out["a"]
  assert out["b"].spec == P("fsdp", "tensor")
  assert out["c"].spec == P("fsdp")
  assert out["opt"]["count"].spec == P()
  # One mesh axis at most once per array.
  assert sharding.logical_to_spec(P("embed", "embed"), mesh) == P("fsdp")
  assert sharding.logical_to_spec(P("batch", None), mesh, shape=(8, 3)) == P(("data", "fsdp"))
  for bad_rules in [(("embed", "model"),), (("embed", "fsdp"), ("embed", None))]:
    try:
      sharding.logical_to_shardings(logical, mesh, bad_rules, shapes)
    except ValueError:
      pass
    else:
      raise AssertionError(f"rules {bad_rules} accepted")
  print("PASS rules", flush=True)


def check_opt_state():
  mesh = sharding.make_mesh((1, 4, 2))
  opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(2e-6, b1=0.0, b2=0.999))
  params_logical = wan.logical_axes(CFG)

  def init(k):
    p = wan.init_params(CFG, k)
    return {"params": p, "opt": opt.init(p), "step": jnp.int32(0)}

  state = sharding.shard_init(
      init, mesh,
      lambda a: {"params": params_logical,
                 "opt": sharding.opt_state_logical(opt, a["opt"], params_logical),
                 "step": None}, args=(KEY,))
  nu = state["opt"][1][0].nu["blocks"]["self_attn"]["q"]["kernel"]
  assert nu.sharding.spec == P(None, "fsdp", "tensor"), nu.sharding
  assert state["opt"][1][0].count.sharding.spec == P()
  print("PASS opt_state", flush=True)
  return state


def check_checkpoint(directory, params):
  """Save on one mesh, restore bit-exact onto it and onto another; typed keys included."""
  mesh_a = sharding.make_mesh((2, 4, 1))
  mesh_b = sharding.make_mesh((1, 4, 2))

  def init(k):
    k1, k2 = jax.random.split(k)
    return {"params": wan.init_params(CFG, k1),
            "rngs": jax.random.split(k2, 8),                           # typed keys, sharded
            "rbg": jax.random.key(7, impl="rbg"),                      # another key impl
            "step": jnp.int32(10)}

  def logical(_):
    return {"params": wan.logical_axes(CFG), "rngs": P("batch"), "rbg": None, "step": None}

  # The same structure and shardings as init() on mesh_a, built without another compile.
  state = {"params": params,
           "rngs": jax.device_put(jax.random.split(jax.random.key(3), 8),
                                  NamedSharding(mesh_a, P(("data", "fsdp")))),
           "rbg": jax.random.key(7, impl="rbg"), "step": jnp.int32(10)}
  assert jax.tree.structure(state) == jax.tree.structure(jax.eval_shape(init, KEY))
  with checkpoint.Checkpointer(directory, save_interval_steps=5, handle_sigterm=False) as ckpt:
    assert ckpt.save(10, state, {"config": {"name": "tiny", "lr": 2e-6}, "skipped": 0})
  for mesh in (mesh_a, mesh_b):
    abstract = sharding.abstract_sharded(init, mesh, logical, args=(KEY,))
    with checkpoint.Checkpointer(directory, handle_sigterm=False) as ckpt:
      assert ckpt.latest_step() == 10
      restored, meta = ckpt.restore(abstract)
    assert meta == {"config": {"name": "tiny", "lr": 2e-6}, "skipped": 0}, meta
    assert_equal_trees(restored, state)
    for r, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
      assert r.sharding == a.sharding, (r.sharding, a.sharding)
    assert restored["rngs"].dtype == state["rngs"].dtype
    assert str(jax.random.key_impl(restored["rbg"])) == str(jax.random.key_impl(state["rbg"]))
    # The restored keys draw the same numbers.
    np.testing.assert_array_equal(jax.random.normal(restored["rngs"][3], (4,)),
                                  jax.random.normal(state["rngs"][3], (4,)))

  # restore_or_init: the abstract state (with shardings) comes from a jitted init.
  abstract = sharding.abstract_sharded(init, mesh_b, logical, args=(KEY,))
  init_b = jax.jit(lambda: init(KEY), out_shardings=jax.tree.map(lambda a: a.sharding, abstract))
  with checkpoint.Checkpointer(directory, handle_sigterm=False) as ckpt:
    resumed, meta, step = ckpt.restore_or_init(init_b)
  assert step == 10 and meta["skipped"] == 0
  assert resumed["params"]["head"]["head"]["kernel"].sharding == (
      abstract["params"]["head"]["head"]["kernel"].sharding)
  assert_equal_trees(resumed, state)
  print("PASS checkpoint_sharded", flush=True)


def main():
  directory = sys.argv[1]
  assert jax.device_count() == 8, jax.devices()
  # The unsharded reference: the same jitted init on one device (op-by-op execution rounds one
  # leaf differently, which has nothing to do with sharding).
  reference = jax.jit(lambda k: wan.init_params(CFG, k))(KEY)
  check_make_mesh()
  print("PASS make_mesh", flush=True)
  check_rules()
  params = check_wan_init(reference)
  check_jit_step(reference)
  check_opt_state()
  check_checkpoint(directory, params)
  print("ALL PASSED", flush=True)


if __name__ == "__main__":
  main()
