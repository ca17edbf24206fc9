"""Where the time would go (`asd_jax.plan.breakdown`): the HLO walker against hand counts.

Programs are compiled for a v5p-8 that is not attached (libtpu; the TPU compiler records no trip
count, so the walker reads the loop's counter) and for the CPU (which records `known_trip_count`).
"""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from asd_jax import plan, targets
from asd_jax.models import wan
from asd_jax.plan import breakdown as bd
from asd_jax.plan import flops as fl
from asd_jax.train.programs import wan_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_configs  # noqa: E402  pylint: disable=wrong-import-position

M, K, N = 64, 128, 256  # one matmul [M, K] @ [K, N]: 2*M*K*N FLOPs


def _mesh(target, shape=(1,), names=("x",)):
  devices = targets.devices(target) if target else jax.devices()
  return jax.make_mesh(shape, names, (AxisType.Auto,) * len(shape),
                       devices=devices[:math.prod(shape)])


def _walk(fn, args, target=None, mesh=None):
  mesh = mesh or _mesh(target)
  rep = NamedSharding(mesh, P())
  args = jax.tree.map(lambda a: a if getattr(a, "sharding", None) else
                      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), args)
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn).lower(*args).compile()
  return bd.walk(compiled.as_text(), num_devices=mesh.size), compiled


def _matmuls(h, ws):
  """h [M, K] through len(ws) matmuls with [K, N] weights (N = K for a chain)."""
  def body(h, w):
    return jnp.tanh(h @ w), None
  return jax.lax.scan(body, h, ws)[0]


@pytest.mark.parametrize("target", ["v5p-8", None])
def test_a_scan_of_n_matmuls_counts_n_times(target):
  layers = 5
  b, compiled = _walk(_matmuls, [jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
                                 jax.ShapeDtypeStruct((layers, K, K), jnp.bfloat16)], target)
  assert b.matmul_flops == layers * 2 * M * K * K
  assert [l["trip_count"] for l in b.loops] == [layers] and not b.unknown_loops
  if target:  # XLA's cost model counts the body once: what the walker corrects
    assert targets.compile_stats(compiled)["flops"] < 2 * (2 * M * K * K)


def test_memory_of_a_scanned_layer_stack_grows_by_one_layer_a_layer():
  """A scan body reads one layer of the stacked weights: bytes grow linearly with the layers
  (reading the whole stack each iteration would grow them quadratically)."""
  def walk(layers):
    return _walk(_matmuls, [jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
                            jax.ShapeDtypeStruct((layers, K, K), jnp.bfloat16)], "v5p-8")[0]
  small, large = walk(5), walk(50)
  per_layer = (large.memory_bytes - small.memory_bytes) / 45
  hand = 2 * (M * K + K * K + M * K)  # the matmul's h, one layer's weights, its output (bf16)
  assert hand <= per_layer < 2 * hand
  assert small.memory_bytes < 5 * per_layer + 2 * hand  # what is outside the loop is small


def test_nested_loops_compose_and_a_dynamic_loop_is_counted_once():
  outer, inner = 3, 4

  def nested(h, ws):
    return jax.lax.fori_loop(0, outer, lambda i, h: _matmuls(h, ws + i.astype(ws.dtype)), h)

  args = [jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
          jax.ShapeDtypeStruct((inner, K, K), jnp.bfloat16)]
  b, _ = _walk(nested, args, "v5p-8")
  assert b.matmul_flops == outer * inner * 2 * M * K * K
  assert sorted(l["trip_count"] for l in b.loops) == sorted([inner, outer])

  def dynamic(h, ws, n):  # a bound known only at run time
    return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ ws[0]), h)

  b, _ = _walk(dynamic, args + [jax.ShapeDtypeStruct((), jnp.int32)], "v5p-8")
  assert b.matmul_flops == 2 * M * K * K  # counted once, and said so
  assert len(b.unknown_loops) == 1 and b.loops[0]["trip_count"] is None


def test_all_gather_and_all_reduce_bytes_under_a_four_device_tpu_mesh():
  mesh = _mesh("v5p-8", (4,))
  rows = 256  # per device: [256, 128] bf16 = 65,536 bytes
  shard = rows * K * 2

  def gather(x):
    full = jax.lax.all_gather(x, "x", tiled=True)  # [1024, 128] on every device
    return full, jax.lax.psum(x.astype(jnp.float32), "x")

  fn = jax.shard_map(gather, mesh=mesh, in_specs=P("x"), out_specs=(P(), P()), check_vma=False)
  x = jax.ShapeDtypeStruct((4 * rows, K), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  b, _ = _walk(fn, [x], mesh=mesh)
  ag, ar = b.collectives["all-gather"], b.collectives["all-reduce"]
  assert ag["count"] == 1 and ag["bytes"] == 4 * shard and ag["ring_bytes"] == 3 * shard
  # The float32 psum of the shard (the TPU compiler folds the cast in: bf16 in, f32 out): 2 *
  # (n - 1) / n of its float32 bytes on the ring.
  assert ar["count"] == 1 and ar["bytes"] == 2 * shard and ar["ring_bytes"] == 2 * 3 / 4 * 2 * shard
  est = bd.estimate(b, targets.parse("v5p-8"))
  link = targets.parse("v5p-8").interconnect_bandwidth_per_device / 2
  assert est.seconds["collectives"] == pytest.approx((3 * shard + 3 * shard) / link)


def _tiny_forward(target):
  """A 3-layer scanned DiT forward (self- and cross-attention per layer) on one device."""
  cfg = wan.WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, freq_dim=32, text_dim=32,
                      dtype="bfloat16", scan_layers=True)
  batch, frames, h, w, text = 2, 6, 8, 10, 16
  mesh = _mesh(target, (1, 1, 1), ("data", "fsdp", "tensor"))
  module = wan.WanModel(cfg)
  args = [wan.abstract_params(cfg), jax.ShapeDtypeStruct((batch, frames, h, w, 16), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, text, 32), jnp.float32)]
  b, _ = _walk(lambda p, x, t, c: module.apply({"params": p}, x, t, c), args, mesh=mesh)
  tokens = fl.tokens(cfg, frames, h, w)
  return b, cfg, fl.forward_flops(cfg, batch, tokens, tokens, text)


def test_splash_kernels_counted_per_layer_and_their_flops_are_the_analytic_attention():
  b_tpu, cfg, analytic = _tiny_forward("v5p-8")
  # Self- and cross-attention a layer, the layer scan run 3 times: 6 kernel runs (2 in the text).
  assert b_tpu.custom_calls["splash_mha_fwd_no_residuals"]["count"] == 2 * cfg.num_layers
  assert b_tpu.custom_calls["splash_mha_fwd_no_residuals"]["target"] == "tpu_custom_call"
  # On the CPU the same attention is XLA dots: the walker's difference is exactly the attention
  # part of the analytic count, the part the TPU plan times from analytic FLOPs.
  b_cpu, _, _ = _tiny_forward(None)
  assert not b_cpu.custom_calls
  assert b_cpu.matmul_flops - b_tpu.matmul_flops == analytic.attention > 0
  est = bd.estimate(b_tpu, targets.parse("v5p-8"), analytic, analytic.attention,
                    kernel_efficiency=0.25)
  assert est.attention_in_kernels and est.compiled_flops == b_cpu.matmul_flops
  peak = targets.parse("v5p-8").peak_bf16_flops_per_device
  # One device: the whole attention on it.
  assert est.seconds["attention kernels"] == pytest.approx(analytic.attention / (0.25 * peak))


@pytest.mark.slow  # suite budget (two compiles); test_plan.py::test_ode_pair_solve checks the plan carries the breakdown
def test_plan_on_v5p_8_carries_the_breakdown_and_remat_shows_in_the_flop_ratio():
  """ODE regression (one block-causal forward and backward): full remat recomputes every block's
  forward, so the compiled/analytic ratio rises by exactly the blocks' non-attention forward
  matmuls over the analytic count (attention is analytic on both sides)."""
  entries = {}
  for remat in ("none", "full"):
    c = run_configs.config("ode_init", batch_size=4, remat=remat)
    target, mesh, world = plan.resolve(c, "v5p-8")
    entries[remat], = plan.plan_training(c, target, mesh, world, only=("ode_regression",))
  data = json.loads(json.dumps(plan.report(list(entries.values()), target, mesh, "ode_init:tiny")))
  d_none, d_full = (p["breakdown"] for p in data["programs"])
  for d in (d_none, d_full):
    assert d["attention_in_kernels"] and d["unknown_loops"] == [] and d["seconds"]["matmul"] > 0
    assert d["total_seconds"] == pytest.approx(sum(d["seconds"].values()))
    assert "not a measurement" in d["model"] and d["xla_seconds"] > 0
  assert d_none["flop_ratio"] >= 1  # nothing of the analytic minimum is missing
  cfg = wan_config(c.models.student, c.dtype, "none")  # the student the trainer builds
  tokens = fl.tokens(cfg, c.latent.frames, c.latent.height, c.latent.width)
  D, F, L = cfg.dim, cfg.ffn_dim, c.data.text_len
  blocks = 4 * cfg.num_layers * (12 * tokens * D * D + 4 * L * D * D + 4 * tokens * D * F)
  analytic = entries["none"].analytic_flops
  assert d_full["flop_ratio"] - d_none["flop_ratio"] == pytest.approx(blocks / analytic, rel=1e-9)
  calls = lambda d: d["custom_calls"]["splash_mha_fwd_residuals"]["count"]
  assert calls(d_full) == 2 * calls(d_none)  # the forward kernels run again in the backward
  text = plan.table(list(entries.values()), target)
  assert "where the time would go" in text and "compiled/analytic FLOPs" in text


@pytest.mark.slow  # 6 s more; the TPU test above covers the walker, this the GPU's forms
def test_gpu_cudnn_attention_and_cublas_matmuls():
  """On an H100 (jax's CUDA plugin, compile only) attention is a cuDNN custom call and dots are
  cuBLAS custom calls: the same matmul FLOPs as the TPU program, kernels counted per layer."""
  if not targets.has_cuda_plugin():
    pytest.skip('needs jax\'s CUDA plugin for a deviceless GPU compile: pip install -e ".[aot-gpu]"')
  b_gpu, cfg, _ = _tiny_forward("h100x1")
  b_tpu, _, _ = _tiny_forward("v5p-8")
  assert b_gpu.matmul_flops == b_tpu.matmul_flops > 0
  (name, call), = b_gpu.custom_calls.items()
  assert name.startswith("__cudnn$fmha") and call["count"] == 2 * cfg.num_layers
  assert [l["trip_count"] for l in b_gpu.loops] == [cfg.num_layers]
