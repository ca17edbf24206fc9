"""Targets compiled for from this CPU: names, devices, and the memory figures of real compiles."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from asd_jax import targets

MiB = 1 << 20


@pytest.mark.parametrize("name, platform, num_devices, topology, kind", [
    ("v5p-8", "tpu", 4, "v5p:2x2x1", "TPU v5"),
    ("v5p-16", "tpu", 8, "v5p:2x2x2", "TPU v5"),
    ("v5p-64", "tpu", 32, "v5p:2x4x4", "TPU v5"),
    ("v4-8", "tpu", 4, "v4:2x2x1", "TPU v4"),
    ("v5e-1", "tpu", 1, "v5e:1x1", "TPU v5 lite"),
    ("v5e-8", "tpu", 8, "v5e:2x4", "TPU v5 lite"),
    ("v6e-1", "tpu", 1, "v6e:1x1", "TPU v6 lite"),
    ("v6e-8", "tpu", 8, "v6e:2x4", "TPU v6 lite"),
    ("v6e-256", "tpu", 256, "v6e:16x16", "TPU v6 lite"),
    ("h100x1", "gpu", 1, "1x1x1", "NVIDIA H100 80GB HBM3"),
    ("h100x8", "gpu", 8, "1x1x8", "NVIDIA H100 80GB HBM3"),
    ("h200x8", "gpu", 8, "1x1x8", "NVIDIA H200"),
    ("a100-80x8", "gpu", 8, "1x1x8", "NVIDIA A100-SXM4-80GB"),
    ("b200x16", "gpu", 16, "1x2x8", "NVIDIA B200"),
])
def test_parse(name, platform, num_devices, topology, kind):
  t = targets.parse(name)
  assert (t.name, t.platform, t.num_devices, t.topology, t.device_kind) == (
      name, platform, num_devices, topology, kind)
  assert t.hbm_bytes_per_device > 15 * targets.GiB
  assert t.peak_bf16_flops_per_device > 1e14 and t.hbm_bandwidth_per_device > 5e11


@pytest.mark.parametrize("name", ["v5p-4", "v5p-12", "v5e-2", "v7-8", "h100x9", "h100", "tpu", ""])
def test_parse_rejects_unknown_names_and_lists_known_ones(name):
  with pytest.raises(ValueError, match="v5p-8.*h100x8"):
    targets.parse(name)


def test_available_names_all_parse():
  assert {"v5p-8", "v6e-1", "v5e-8", "h100x8", "h100x1", "b200x8"} <= set(targets.available())
  for name in targets.available():
    targets.parse(name)


def test_gpu_target_config_carries_the_hardware_facts():
  text = targets.gpu_target_config(targets._GPUS["h100"])
  assert "core_count: 132" in text and "major: 9" in text and "ACCELERATED_FEATURES" in text
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "dnn_version_info {\n  major: 9\n  minor: 8" in text
  assert "ACCELERATED_FEATURES" not in targets.gpu_target_config(targets._GPUS["a100-80"])


# ---------------------------------------------------------------------------------------------- TPU

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install libtpu)")


@needs_libtpu
@pytest.mark.parametrize("name", ["v5p-8", "v5p-16", "v4-8", "v5e-8", "v6e-8", "v6e-1"])
def test_tpu_devices(name):
  t = targets.parse(name)
  devs = targets.devices(t)
  assert len(devs) == t.num_devices
  assert {d.platform for d in devs} == {"tpu"} and {d.device_kind for d in devs} == {t.device_kind}
  assert targets.devices(name) == devs  # cached


@needs_libtpu
def test_tpu_compile_memory_and_flops_of_a_sharded_matmul():
  """[4096, 8192] @ [8192, 4096] in bfloat16 over v5p-8, rows over 4 chips, weights replicated."""
  mesh = Mesh(np.array(targets.devices("v5p-8")), ("data",))
  rows, cols = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((4096, 8192), jnp.bfloat16, sharding=rows)
  w = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16, sharding=cols)
  compiled = jax.jit(jnp.matmul, out_shardings=rows).lower(x, w).compile()
  stats = targets.compile_stats(compiled)
  assert stats["argument"] == 1024 * 8192 * 2 + 8192 * 4096 * 2  # per device: 16 MiB + 64 MiB
  assert stats["output"] == 1024 * 4096 * 2
  assert stats["alias"] == 0 and stats["temp"] < 16 * MiB
  assert stats["total"] == stats["argument"] + stats["output"] + stats["temp"]
  assert stats["flops"] == pytest.approx(2 * 1024 * 8192 * 4096, rel=0.01)
  assert 0 < stats["optimal_seconds"] < 1e-2
  assert "argument" in stats and stats["generated_code"] > 0


@needs_libtpu
def test_tpu_compile_counts_donation_as_alias_and_refuses_what_does_not_fit():
  mesh = Mesh(np.array(targets.devices("v6e-1")), ("data",))
  s = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=s)
  stats = targets.compile_stats(jax.jit(lambda a: a + 1, donate_argnums=0).lower(x).compile())
  assert stats["alias"] == stats["argument"] == stats["output"] == 4 * MiB
  assert stats["total"] == 4 * MiB + stats["temp"]
  hbm = targets.parse("v6e-1").hbm_bytes_per_device
  too_big = jax.ShapeDtypeStruct((hbm // 2 + MiB,), jnp.float32, sharding=s)
  with pytest.raises(Exception, match="HBM"):
    jax.jit(lambda a: a * 2).lower(too_big).compile()


# ---------------------------------------------------------------------------------------------- GPU

needs_cuda_plugin = pytest.mark.skipif(
    not targets.has_cuda_plugin(),
    reason=f'jax\'s CUDA plugin not installed (pip install "jax[cuda12]=={jax.__version__}")')


@needs_cuda_plugin
def test_gpu_devices():
  devs = targets.devices("h100x8")
  assert len(devs) == 8 and {d.platform for d in devs} == {"gpu"}
  assert devs[0].device_kind == "NVIDIA H100 80GB HBM3"


def _attention_stats(implementation, tokens=32768):
  mesh = Mesh(np.array(targets.devices("h100x1")), ("data",))
  qkv = jax.ShapeDtypeStruct((1, tokens, 12, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  compiled = jax.jit(attend).lower(qkv, qkv, qkv).compile()
  return targets.compile_stats(compiled), compiled.as_text()


@needs_cuda_plugin
def test_gpu_cudnn_attention_keeps_no_scores_where_xla_attention_materialises_them():
  """bf16 [1, 32768, 12, 128] on an H100: cuDNN flash attention vs XLA's softmax(QK^T)V."""
  try:
    cudnn, hlo = _attention_stats("cudnn")
  except RuntimeError as e:  # jax reads the local cuDNN's version before emitting its attention
    pytest.skip(f"cuDNN not usable here ({e}); pip install \"jax[cuda12]=={jax.__version__}\"")
  assert "__cudnn$fmha" in hlo
  assert cudnn["temp"] < 2**30
  assert cudnn["argument"] == 3 * 32768 * 12 * 128 * 2 and cudnn["output"] == 32768 * 12 * 128 * 2
  xla, _ = _attention_stats("xla")
  assert xla["temp"] > 10 * 2**30  # 12 heads x 32768^2 scores
  assert cudnn["flops"] is None  # the GPU compiler gives no cost analysis
