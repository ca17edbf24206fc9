"""Speed and memory of the training steps, built exactly as the trainer builds them.

  python benchmarks/train_step.py [--config=configs/asd.py[:ARG]] [--config.FIELD=VALUE ...]
      [--target=v5p-8|h100x1|...] [--peak_tflops=989] [--warmup=1] [--repeats=3]
      [--unroll_layers] [--only=generator,...] [--json=FILE]

The steps come from the config through `asd_jax.train.programs.build_programs` (the trainer's
programs: its shapes, dtypes, shardings over `mesh_shape`, donation, gradient accumulation), via
the planner's `asd_jax.plan.training_jobs`, which also gives each step's analytic FLOPs
(`asd_jax/plan/flops.py`). Default config: `configs/asd.py:tiny` (tiny random models; seconds on
a CPU).

Without `--target`: on the local devices (CPU here, GPU/TPU on a real host). The state is made as
a fresh training run makes it (weights read from `init.*` when the config names them, random
otherwise; a random batch of the step's shapes) and each step is timed: the median seconds over
`--repeats` calls after `--warmup` calls (compile excluded, reported apart; each call draws its exit
index at random as in training, so calls differ), the FLOPs XLA's HLO cost analysis counts for the
compiled step (per device; 2 per multiply-add, remat recomputation included; a loop body counts
once whatever its trip count: the scanned layer stack unless `--unroll_layers`, the chunk scan, the
rollout's no-gradient loop, so it is a lower bound), the analytic FLOPs (the step's expected
matmul FLOPs, no remat), the achieved TFLOP/s per device of both, the MFU (analytic) against
`--peak_tflops` per device (989 for H100/H200 bf16 dense; not reported unless given) and the
compiled program's memory (`memory_analysis()`: argument + output - alias + temporaries, per
device), plus the device's own peak where it reports one (GPU, TPU).

With `--target=NAME` (as `asd_jax.targets` names it: v5p-8, v6e-1, h100x1, h100x8, ...): nothing
runs and nothing is timed. The same programs are compiled for the target without it, by the
planner (`asd_jax.plan.resolve` and `plan_training`, as `python -m asd_jax.plan` does), and its
figures are reported: per-device memory against the device's, analytic FLOPs and, on TPU, XLA's
cost-model FLOPs and seconds. Exit status as the planner's: 0 fits, 3 does not, 1 a compile error.

Bad input (flags, config, mesh, target) is one `error:` line and exit status 2, before any work.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from asd_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "asd.py") + ":tiny",
                                          "a configs/*.py file[:ARG]", lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "compile for this target without it (v5p-8, "
                              "v6e-1, h100x1, h100x8, ...): no timing; default: run locally")
_JSON = flags.DEFINE_string("json", None, "also write the JSON to this file")
_PEAK = flags.DEFINE_float("peak_tflops", None, "local mode: the device's peak TFLOP/s for MFU")
_WARMUP = flags.DEFINE_integer("warmup", 1, "local mode: untimed calls per step", lower_bound=0)
_REPEATS = flags.DEFINE_integer("repeats", 3, "local mode: timed calls per step", lower_bound=1)
_UNROLL = flags.DEFINE_bool("unroll_layers", False, "set models.*.scan_layers=False (XLA then "
                            "counts every layer; slower compile)")
_ONLY = flags.DEFINE_list("only", None, "only these programs (generator, critic, discriminator, "
                          "ode_regression, pretrain; state_init with --target)")
_FRACTION = flags.DEFINE_float("memory_fraction", 1.0, "--target: the share of each device's "
                               "memory a program may use", lower_bound=0.0, upper_bound=1.0)
FLAGS = flags.FLAGS


def _log(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _device_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {"jax": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "jax_version": jax.__version__}


def _device_peak_bytes() -> int | None:
  """The largest `peak_bytes_in_use` any local device reports (None where none does: CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def fresh_inputs(config, progs, mesh, seed: int):
  """Teacher params, state and one batch, as a fresh training run makes them.

  Networks: `asd_jax.train.loop._params_or_init` (the trainer's: read from `init.*` where the config
  names a directory, random otherwise, created in their shards), the state by `progs.init`; the
  batch is random normal with the shapes and shardings of the step's batch argument.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from asd_jax.models import disc  # pylint: disable=g-import-not-at-top
  from asd_jax.train import loop, sharding as shd  # pylint: disable=g-import-not-at-top
  from asd_jax.train.programs import heads_logical  # pylint: disable=g-import-not-at-top
  c, rules = config, progs.rules
  k_gen, k_critic, k_teacher, k_heads, k_run, k_batch = jax.random.split(jax.random.key(seed), 6)
  distill = c.stage in ("dmd", "asd")
  params_or_init = loop._params_or_init  # pylint: disable=protected-access
  generator = params_or_init(c.init.student, progs.student_cfg, k_gen, mesh, rules)
  critic = (params_or_init(c.init.critic or c.init.teacher, progs.critic_cfg, k_critic, mesh,
                           rules) if distill else {})
  heads = (shd.shard_init(lambda k: disc.init_heads(progs.heads_cfg, k), mesh,
                          heads_logical(progs.heads_cfg), rules, args=(k_heads,))
           if progs.heads_cfg is not None else {})
  state = progs.init(k_run, generator, critic, heads)
  teacher = ({} if progs.teacher_cfg is None else
             params_or_init(c.init.teacher, progs.teacher_cfg, k_teacher, mesh, rules))
  abstract_batch = progs.args[next(iter(progs.steps))][2]
  keys = jax.random.split(k_batch, len(abstract_batch))
  batch = {name: jax.device_put(jax.random.normal(k, a.shape, a.dtype), a.sharding)
           for k, (name, a) in zip(keys, sorted(abstract_batch.items()))}
  return teacher, state, batch


def run_local(config, config_name: str) -> tuple[dict, int]:
  """Times every step of the config's stage on the local devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from asd_jax import plan, targets  # pylint: disable=g-import-not-at-top
  from asd_jax.train.programs import STEP_NAMES  # pylint: disable=g-import-not-at-top
  try:
    _, mesh, world = plan.resolve(config, None)
  except plan.BadInput as e:
    return {}, _error(str(e))
  only = tuple(_ONLY.value) if _ONLY.value else None
  with jax.set_mesh(mesh):
    progs, jobs = plan.training_jobs(config, mesh, world)
    steps = [(key, plan.program_name(config.stage, key)) for key in progs.steps]
    try:
      plan._check_only(only, [name for _, name in steps])  # pylint: disable=protected-access
    except plan.BadInput as e:
      return {}, _error(f"{e} (state_init is compiled with --target only)")
    jobs = {j[0]: j for j in jobs}
    teacher, state, batch = fresh_inputs(config, progs, mesh, config.seed)
    n_dev = mesh.size
    peak = _PEAK.value
    result = {
        "benchmark": "train_step", "mode": "local", "timed": True,
        "device": _device_info(), "config": config_name, "stage": config.stage,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "unroll_layers": _UNROLL.value, "peak_tflops_per_device": peak,
        "timing": f"median seconds of {_REPEATS.value} calls after {_WARMUP.value} warm-up "
                  f"call(s), compile excluded (compile_seconds apart); the state is threaded "
                  f"through the calls (donated, as in training) and each call draws its exit "
                  f"index at random, so single calls differ (all_seconds)",
        "flop_counters": {
            "xla_flops": "XLA's HLO cost analysis of the compiled step, per device (2 per "
                         "multiply-add, remat recomputation included); a loop body counts once "
                         "whatever its trip count (the chunk scan, the rollout's no-gradient "
                         "loop" + ("" if _UNROLL.value else ", the scanned layer stack") +
                         "), so it is a lower bound",
            "analytic_flops": "the step's expected matmul FLOPs, all devices, no remat "
                              "(asd_jax/plan/flops.py)",
            "mfu": "analytic FLOPs / devices / seconds / peak_tflops_per_device",
        },
        "memory": "bytes per device of the compiled program (XLA's memory analysis: argument + "
                  "output - alias + temp); device_peak_bytes_in_use: the device's own peak so "
                  "far in this process (GPU/TPU only), all programs before it included",
        "steps": {},
    }
    cycle_s, cycle_flops = 0.0, 0.0
    per_cycle = dict(zip(STEP_NAMES, progs.ratio))
    for key, name in steps:
      count = per_cycle[key]
      if only and name not in only:
        continue
      _, fn, args, analytic = jobs[name]
      _log(f"compiling {name} ...")
      t0 = time.perf_counter()
      compiled = fn.lower(*args).compile()
      compile_s = time.perf_counter() - t0
      stats = targets.compile_stats(compiled)
      index = (() if key == "generator" else
               (jax.device_put(np.int32(0), args[3].sharding),))
      times = []
      for i in range(_WARMUP.value + _REPEATS.value):
        t0 = time.perf_counter()
        state, metrics = compiled(teacher, state, batch, *index)
        jax.block_until_ready((state, metrics))
        if i >= _WARMUP.value:
          times.append(time.perf_counter() - t0)
      sec = statistics.median(times)
      xla = stats.get("flops")
      entry = {
          "step": key, "per_cycle": count, "seconds": sec, "all_seconds": times,
          "compile_seconds": compile_s, "xla_flops": xla, "analytic_flops": analytic,
          "xla_tflops_per_s_per_device": xla / sec / 1e12 if xla else None,
          "analytic_tflops_per_s_per_device": (analytic / n_dev / sec / 1e12
                                               if analytic else None),
          "memory": {k: stats[k] for k in ("argument", "output", "alias", "temp", "total",
                                           "generated_code")},
          "peak_bytes": stats["total"], "device_peak_bytes_in_use": _device_peak_bytes(),
      }
      if peak and analytic:
        entry["mfu"] = entry["analytic_tflops_per_s_per_device"] / peak
      result["steps"][name] = entry
      _log(f"  {name}: {sec:.4g} s, {(analytic or 0) / 1e12:.4g} analytic TFLOP, "
           f"{stats['total'] / 1e9:.3g} GB per device")
      cycle_s += count * sec
      cycle_flops += count * (analytic or 0.0)
  if not only:
    result["cycle"] = {"ratio": list(progs.ratio), "seconds": cycle_s,
                       "analytic_tflops_per_s_per_device": cycle_flops / n_dev / cycle_s / 1e12,
                       # as the trainer logs perf/samples_per_s
                       "samples_per_s": config.batch_size * sum(progs.ratio) / cycle_s}
    if peak:
      result["cycle"]["mfu"] = result["cycle"]["analytic_tflops_per_s_per_device"] / peak
  return result, 0


def run_target(config, config_name: str) -> tuple[dict, int]:
  """Compiles every program of the config's stage for a target that is not attached."""
  from asd_jax import plan  # pylint: disable=g-import-not-at-top
  try:
    target, mesh, world = plan.resolve(config, _TARGET.value, _FRACTION.value)
  except (plan.BadInput, RuntimeError, FileNotFoundError, ValueError) as e:
    return {}, _error(str(e))
  only = tuple(_ONLY.value) if _ONLY.value else None
  try:
    entries = plan.plan_training(config, target, mesh, world, only=only, log=_log)
  except plan.BadInput as e:  # raised before the first compile
    return {}, _error(str(e))
  _log(plan.table(entries, target))
  extra = {"benchmark": "train_step", "mode": "deviceless", "timed": False,
           "timing": f"none: compiled for {target.name} without the device, nothing ran; the "
                     f"figures are the planner's (python -m asd_jax.plan): XLA's memory analysis "
                     f"and, on TPU, its cost model (xla_seconds is an estimate, not a "
                     f"measurement)",
           "stage": config.stage, "unroll_layers": _UNROLL.value}
  result = plan.report(entries, target, mesh, config_name, extra)
  if any(e.error and not e.error.startswith("out of memory") for e in entries):
    return result, 1
  return result, 0 if all(e.fits for e in entries) else 3


def main(argv) -> int:
  if len(argv) > 1:
    return _error(f"unexpected arguments {argv[1:]}")
  if _TARGET.value:
    from asd_jax import targets  # pylint: disable=g-import-not-at-top
    targets.quiet_cuda_plugin()  # before jax looks for its plugins: GPU targets need it
  config = _CONFIG.value
  if _UNROLL.value:
    with config.unlocked():
      for name in config.models:
        config.models[name].scan_layers = False
  config_name = FLAGS["config"].serialize().split("=", 1)[-1]
  result, code = (run_target if _TARGET.value else run_local)(config, config_name)
  if not result:
    return code
  from asd_jax import plan  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  result["config_values"] = config.to_dict()
  print(json.dumps(result, indent=1, default=str))
  if _JSON.value:
    plan.write_json(_JSON.value, result)
  return code


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_absl_flags)
