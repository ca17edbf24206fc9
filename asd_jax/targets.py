"""Accelerator targets that need not be attached: their devices, for ahead-of-time compilation.

`devices(parse("v5p-8"))` gives compile-only devices of a TPU slice (through `libtpu`) or of an
NVIDIA GPU host (through jax's CUDA plugin, given a target config built here from a small table of
hardware facts). A Mesh over them compiles any jitted program exactly as the real host would:

  target = targets.parse("h100x8")
  mesh = jax.sharding.Mesh(np.array(targets.devices(target)).reshape(8, 1), ("data", "tensor"))
  compiled = jax.jit(step, in_shardings=..., out_shardings=...).lower(*abstract_args).compile()
  targets.compile_stats(compiled)  # per-device bytes, XLA's FLOPs and estimated seconds

Names: a TPU slice as Cloud TPU names it (`v5p-8`, `v5p-16`, `v4-8`, `v5e-1`, `v5e-8`, `v6e-8`,
...; v4 and v5p count TensorCores, two a chip, v5e and v6e count chips), a GPU host as `h100x8`,
`h200x8`, `a100-80x8`, `b200x8` (any count up to 8, or a multiple of 8 for several hosts of 8).

Requirements: `pip install libtpu` for TPU targets; for GPU targets jax's CUDA plugin with its CUDA
libraries (`pip install "jax[cuda12]==<jax version>"`: ptxas, and cuDNN, which jax consults before
emitting a cuDNN attention). Neither needs the accelerator. With the CUDA plugin installed on a
machine without a GPU, jax prints a traceback when it starts and leaves the plugin out, unless
JAX_PLATFORMS=cpu or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 is set first (`devices()` sets the latter
when it comes first, `quiet_cuda_plugin()` on request): CPU stays the default, GPU targets compile.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
from typing import Any

import jax

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Target:
  """One accelerator host or slice, as compiled for.

  Attributes:
    name: the name it was parsed from, e.g. "v5p-8" or "h100x8".
    platform: "tpu" or "gpu".
    device_kind: what `jax.Device.device_kind` reports for its devices, e.g. "TPU v5".
    num_devices: jax devices in the target (TPU v4/v5p: one per chip, its two cores as one device).
    hbm_bytes_per_device: memory a program may use on one device, in bytes. TPU: the largest output
      the TPU compiler accepts (libtpu 0.0.52, measured; it also holds the program's code). GPU: the
      memory the driver reports; jax preallocates 75% of it unless
      XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise, and the GPU compiler does not refuse a program
      that exceeds it.
    peak_bf16_flops_per_device: dense bfloat16 matmul peak, FLOP/s, from the vendor's data sheet.
    hbm_bandwidth_per_device: bytes/s, from the vendor's data sheet.
    topology: what the compiler is given: libtpu's topology name ("v5p:2x2x1") or the CUDA plugin's
      "<slices>x<hosts per slice>x<devices per host>".
    interconnect_bandwidth_per_device: bytes/s between devices, both directions together, all
      links of a device (TPU ICI, NVLink within a host), from the data sheet (`_INTERCONNECT`).
  """
  name: str
  platform: str
  device_kind: str
  num_devices: int
  hbm_bytes_per_device: int
  peak_bf16_flops_per_device: float
  hbm_bandwidth_per_device: float
  topology: str
  interconnect_bandwidth_per_device: float = 0.0


# ---------------------------------------------------------------------------------------------- TPU


@dataclasses.dataclass(frozen=True)
class _TpuKind:
  libtpu_name: str  # the generation as libtpu's topology names spell it
  device_kind: str
  dims: int  # 3 for the 3D tori (v4, v5p), 2 for the 2D meshes (v5e, v6e)
  cores_per_chip_in_name: int  # Cloud names count TensorCores on v4 and v5p
  usable_hbm: int  # bytes; see Target.hbm_bytes_per_device
  peak_bf16: float
  bandwidth: float


_TPUS = {
    # usable_hbm: bisected on this machine as the largest output a program may have on one device;
    # the compiler's OOM message rounds the same figures ("exceeds available HBM (95.74G)").
    "v4": _TpuKind("v4", "TPU v4", 3, 2, 33_012_264_960, 275e12, 1.2e12),
    "v5p": _TpuKind("v5p", "TPU v5", 3, 2, 102_784_477_184, 459e12, 2.765e12),
    "v5e": _TpuKind("v5e", "TPU v5 lite", 2, 1, 16_908_219_392, 197e12, 0.819e12),
    "v6e": _TpuKind("v6e", "TPU v6 lite", 2, 1, 33_544_922_112, 918e12, 1.64e12),
}
_TPU_SIZES_3D = tuple(2 * 4 * 2**i for i in range(9))  # v4-8, v5p-8 ... (4 chips ... 1024 chips)
_TPU_SIZES_2D = (1,) + tuple(4 * 2**i for i in range(7))  # v5e-1, v5e-4 ... v5e-256


def _chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The chip grid of a power-of-two slice, as Cloud TPU lays it out: 2x2x1, 2x2x2, 2x2x4..."""
  grid = [1] * dims
  if dims == 3:
    grid = [2, 2, 1]
  while math.prod(grid) < chips:
    smallest = min(grid)
    last = max(i for i, g in enumerate(grid) if g == smallest)
    grid[last] *= 2
  return tuple(grid)


def _tpu_topology_kwargs(kind: _TpuKind, grid: tuple[int, ...]) -> dict[str, Any]:
  chips = math.prod(grid)
  if kind.dims == 3:
    # v4/v5p hosts hold 2x2x1 chips; "megacore" fuses the two cores of a chip into one device.
    return dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1))
  # v5e/v6e: slices of up to 8 chips are one host; larger ones are hosts of 2x2 chips.
  per_host = (grid[0], grid[1], 1) if chips <= 8 else (2, 2, 1)
  return dict(chips_per_host_bounds=per_host)


# Bidirectional inter-device bandwidth per device, bytes/s (all links, both directions together).
# TPU: "Bidirectional inter-chip interconnect (ICI) bandwidth per chip" in Cloud TPU's system
# architecture pages (v5p 1200 GB/s, v5e 400 GB/s, v6e 800 GB/s); v4's page gives none: six ICI
# links of 45 GB/s each way (the JAX scaling book's TPU table). GPU: NVIDIA's data sheets, NVLink
# within one host (H100/H200 SXM 900 GB/s, A100 SXM 600 GB/s, B200 1.8 TB/s); between hosts of a
# multi-host target the network (InfiniBand, ~50 GB/s a GPU) is far slower and not modelled.
_INTERCONNECT = {"v4": 540e9, "v5p": 1200e9, "v5e": 400e9, "v6e": 800e9,
                 "h100": 900e9, "h200": 900e9, "a100-80": 600e9, "b200": 1800e9}


# ---------------------------------------------------------------------------------------------- GPU


@dataclasses.dataclass(frozen=True)
class _GpuFacts:
  """What XLA's GPU compiler needs to know of a GPU, and what the plan reports."""
  description: str  # the device name the CUDA driver reports, which becomes `device_kind`
  compute_capability: tuple[int, int]
  sm_count: int
  fp32_units_per_sm: int
  clock_ghz: float  # boost clock
  memory_bytes: int  # as the driver reports it (a little under the marketed size)
  bandwidth: float  # bytes/s
  l2_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  peak_bf16: float  # dense


_GPUS = {
    "h100": _GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 1.98, 84_942_979_072, 3.35e12,
                      50 * 2**20, 228 * 1024, 227 * 1024, 989e12),
    "h200": _GpuFacts("NVIDIA H200", (9, 0), 132, 128, 1.98, 150_754_820_096, 4.8e12,
                      50 * 2**20, 228 * 1024, 227 * 1024, 989e12),
    "a100-80": _GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 1.41, 85_100_068_864, 2.039e12,
                         40 * 2**20, 164 * 1024, 163 * 1024, 312e12),
    "b200": _GpuFacts("NVIDIA B200", (10, 0), 148, 128, 1.965, 191_514_411_008, 8.0e12,
                      126 * 2**20, 228 * 1024, 227 * 1024, 2.25e15),
}

# The cuDNN the target host is assumed to run: the oldest jax's CUDA plugin accepts
# (nvidia-cudnn-cu12>=9.8).
# XLA reads it to decide which cuDNN rewrites it may apply; jax's own checks before emitting a cuDNN
# attention read the cuDNN installed here.
CUDNN_VERSION = (9, 8, 0)


def gpu_target_config(facts: _GpuFacts, cudnn: tuple[int, int, int] = CUDNN_VERSION) -> str:
  """A GpuTargetConfigProto (xla/stream_executor/device_description.proto) as text, for one GPU."""
  major, minor = facts.compute_capability
  # Hopper and Blackwell compile for their arch-specific features (sm_90a, sm_100a), as on a device.
  extension = "\n    feature_extension: ACCELERATED_FEATURES" if major >= 9 else ""
  dnn = ".".join(map(str, cudnn))
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {facts.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {facts.sm_count}
  fpus_per_core: {facts.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(facts.bandwidth)}
  l2_cache_size: {facts.l2_bytes}
  clock_rate_ghz: {facts.clock_ghz}
  device_memory_size: {facts.memory_bytes}
  shared_memory_per_block_optin: {facts.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}{extension}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  dnn_version: "{dnn}"
  name: "{facts.description}"
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {cudnn[0]}
  minor: {cudnn[1]}
  patch: {cudnn[2]}
}}
device_description_str: "{facts.description}"
"""


# ---------------------------------------------------------------------------------------------- API


def available() -> tuple[str, ...]:
  """Example target names, smallest first in each family (any valid size parses)."""
  tpus = [f"{g}-{n}" for g, k in _TPUS.items()
          for n in ((8, 16, 32, 64) if k.dims == 3 else (1, 4, 8, 16))]
  gpus = [f"{g}x{n}" for g in _GPUS for n in (1, 8)]
  return tuple(tpus + gpus)


def _unknown(name: str, why: str) -> ValueError:
  return ValueError(f"unknown target {name!r} ({why}); targets are TPU slices "
                    f"<{'|'.join(_TPUS)}>-<size> or GPU hosts <{'|'.join(_GPUS)}>x<count>, "
                    f"e.g. {', '.join(available())}")


def parse(name: str) -> Target:
  """The target a name denotes.

  Args:
    name: a TPU slice as Cloud TPU names it ("v5p-8": 8 TensorCores, 4 chips; "v5e-8": 8 chips) or a
      GPU host ("h100x8"; "h100x16" is two hosts of 8).

  Returns:
    The Target.

  Raises:
    ValueError: the name is not a known target; the message lists valid ones.
  """
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
  if m:
    kind = _TPUS[m.group(1)]
    size = int(m.group(2))
    sizes = _TPU_SIZES_3D if kind.dims == 3 else _TPU_SIZES_2D
    if size not in sizes:
      raise _unknown(name, f"{m.group(1)} slices here: {', '.join(map(str, sizes))}")
    chips = size // kind.cores_per_chip_in_name
    grid = _chip_grid(chips, kind.dims)
    return Target(name=name, platform="tpu", device_kind=kind.device_kind, num_devices=chips,
                  hbm_bytes_per_device=kind.usable_hbm, peak_bf16_flops_per_device=kind.peak_bf16,
                  hbm_bandwidth_per_device=kind.bandwidth,
                  topology=f"{kind.libtpu_name}:{'x'.join(map(str, grid))}",
                  interconnect_bandwidth_per_device=_INTERCONNECT[m.group(1)])
  m = re.fullmatch(r"(h100|h200|a100-80|b200)x(\d+)", name)
  if m:
    facts = _GPUS[m.group(1)]
    count = int(m.group(2))
    if not (1 <= count <= 8 or count % 8 == 0):
      raise _unknown(name, "a GPU count is 1 to 8 in one host, or a multiple of 8 for hosts of 8")
    hosts, per_host = (count // 8, 8) if count > 8 else (1, count)
    return Target(name=name, platform="gpu", device_kind=facts.description, num_devices=count,
                  hbm_bytes_per_device=facts.memory_bytes,
                  peak_bf16_flops_per_device=facts.peak_bf16,
                  hbm_bandwidth_per_device=facts.bandwidth, topology=f"1x{hosts}x{per_host}",
                  interconnect_bandwidth_per_device=_INTERCONNECT[m.group(1)])
  raise _unknown(name, "no such name")


def quiet_cuda_plugin() -> None:
  """Lets jax's CUDA plugin register on a machine without a GPU, without a traceback.

  Effective before jax discovers its plugins (the first `jax.devices()`, jit or `devices()` call).
  Without it, and without JAX_PLATFORMS=cpu, the plugin probes the CUDA driver for its version,
  finds no GPU, prints a traceback and stays unregistered: no GPU target in that process.
  It skips only that version check: on a GPU host the GPU stays the default backend.
  """
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def _prepare_libtpu(target: Target) -> None:
  # What libtpu would read from a TPU VM's metadata server; without them it logs errors at load.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
  # Compile-only use: several processes (e.g. parallel test workers) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def has_cuda_plugin() -> bool:
  """Whether jax's CUDA plugin is installed (without importing it; False where the `jax_plugins`
  namespace itself is absent, where find_spec of the dotted name would raise)."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


@functools.lru_cache(maxsize=None)
def _devices(name: str) -> tuple[jax.Device, ...]:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  target = parse(name)
  if target.platform == "tpu":
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
      raise RuntimeError(f"target {name} needs libtpu to compile for TPU: pip install libtpu")
    _prepare_libtpu(target)
    kind = _TPUS[name.split("-")[0]]
    grid = tuple(int(g) for g in target.topology.split(":")[1].split("x"))
    desc = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                        **_tpu_topology_kwargs(kind, grid))
  else:
    install = f'pip install "jax[cuda12]=={jax.__version__}"'
    if not has_cuda_plugin():
      raise RuntimeError(f"target {name} needs jax's CUDA plugin to compile for GPU: {install}")
    quiet_cuda_plugin()
    facts = _GPUS[name.rsplit("x", 1)[0]]
    try:
      desc = topologies.get_topology_desc("cuda", "cuda", target_config=gpu_target_config(facts),
                                          topology=target.topology)
    except NotImplementedError as e:
      raise RuntimeError(
          f"target {name}: jax's CUDA plugin is installed but did not register ({e}); without a "
          f"GPU set JAX_PLATFORMS=cpu or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before jax starts (or "
          f"call targets.quiet_cuda_plugin() first); if it is missing parts: {install}") from e
  devices = tuple(desc.devices)
  if len(devices) != target.num_devices:
    raise RuntimeError(f"target {name}: expected {target.num_devices} devices, the compiler gave "
                       f"{len(devices)} for topology {target.topology}")
  return devices


def devices(target: Target | str) -> list[jax.Device]:
  """Compile-only devices of a target, for a Mesh (cached per process).

  Args:
    target: a Target or its name.

  Returns:
    `target.num_devices` devices; they compile programs (`jax.jit(...).lower(...).compile()`) but
    cannot run them.

  Raises:
    ValueError: an unknown name.
    RuntimeError: libtpu or the CUDA plugin is missing (the message gives the pip command).
  """
  name = target if isinstance(target, str) else target.name
  return list(_devices(name))


# libtpu 0.0.52 aborts compiling the ASD generator step over an FSDP mesh on v5p (1,4,1):
# "fusion_emitter.cc:3281 Check failed: CollapsedBoundIsAdmissible(...) Scaled window bound is not
# full coverage nor a power of 2 with rectangular placements". Turning off its sublane-major
# scaling bitcast fusion avoids it (the same step, 2 layers, compiled with this option and
# aborted without it). The trainer's programs carry it on TPU (`training_compiler_options`), so a
# real TPU host and a deviceless plan compile them alike.
TPU_TRAINING_OPTIONS = {"xla_tpu_enable_sublane_major_scaling_bitcast_fusion": "false"}


def training_compiler_options(mesh_devices: Any) -> dict[str, Any] | None:
  """XLA options the trainer's jitted programs carry (`jax.jit(..., compiler_options=...)`) on
  the platform of `mesh_devices` (a Mesh's `devices` array or a list): TPU_TRAINING_OPTIONS on a
  TPU, None elsewhere."""
  first = next(iter(getattr(mesh_devices, "flat", mesh_devices)))
  return dict(TPU_TRAINING_OPTIONS) if first.platform == "tpu" else None


def compiler_options(target: Target | str) -> dict[str, Any]:
  """XLA options for compiling for `target` without it: `lowered.compile(compiler_options=...)`.

  GPU: Triton GEMM fusions are turned off. Without a device XLA cannot autotune their tiles, and
  for some fused dots (seen in the discriminator heads' backward and in a [2096640, 1536] matmul of
  the generator step) it then finds none and fails ("Couldn't find output tile sizes"); the dots go
  to cuBLAS instead, as on a GPU where Triton declines them. Memory figures can differ a little
  from a host that autotunes. TPU: none.
  """
  target = parse(target) if isinstance(target, str) else target
  if target.platform == "gpu":
    return {"xla_gpu_enable_triton_gemm": False}
  return {}


def compile_stats(compiled: Any) -> dict[str, float | int | None]:
  """Per-device memory and XLA's cost figures of a compiled program.

  Args:
    compiled: what `jax.jit(f).lower(...).compile()` returns.

  Returns:
    Bytes per device: "argument", "output", "alias" (outputs sharing an argument's buffer, i.e.
    donation), "temp", "generated_code", and "total" = argument + output - alias + temp (what the
    program holds at its peak besides its code). XLA's cost model, where the backend gives it (TPU:
    yes; GPU: no, these are None): "flops" (per device; a loop body, e.g. a scanned layer stack, is
    counted once, not once per iteration), "bytes_accessed" and "optimal_seconds" (an estimate, not
    a measurement).
  """
  mem = compiled.memory_analysis()
  stats: dict[str, float | int | None] = {
      "argument": int(mem.argument_size_in_bytes),
      "output": int(mem.output_size_in_bytes),
      "alias": int(mem.alias_size_in_bytes),
      "temp": int(mem.temp_size_in_bytes),
      "generated_code": int(mem.generated_code_size_in_bytes),
  }
  stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0] if cost else None
  cost = cost or {}
  for key, field in (("flops", "flops"), ("bytes_accessed", "bytes accessed"),
                     ("optimal_seconds", "optimal_seconds")):
    value = cost.get(field)
    stats[key] = float(value) if value is not None else None
  return stats
