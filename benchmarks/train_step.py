"""Speed and memory of the distillation steps: generator, critic and discriminator, and a ratio cycle.

Random weights; one process, one device. For each step: the median seconds over repeats after a
warm-up (compile excluded), the FLOPs XLA's HLO cost analysis counts for the compiled step
(`compiled.cost_analysis()['flops']`: every HLO op's FLOPs, 2 per multiply-add, remat recomputation
included; a loop body counts once whatever its trip count, so with the chunk scan and the rollout's
no-gradient loop the figure is a lower bound), the achieved TFLOP/s, the MFU against `--peak_tflops` (989 for H100/H200 bf16 dense;
not reported on CPU unless given) and the peak memory of the compiled program
(`memory_analysis()`: arguments + outputs + temporaries - aliased donations).

CPU default: the tiny models. GPU (the issue's setting): `--student=1.3b --teacher=1.3b
--critic=1.3b --frames=21 --height=60 --width=104 --dtype=bfloat16 --remat=full`.
Self Forcing trains at about 20% MFU.

Usage: python benchmarks/train_step.py [--student=tiny] [--ratio=1,4,1] [--repeats=3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from asd_jax.diffusion import few_step_schedule  # noqa: E402
from asd_jax.models import disc, wan  # noqa: E402
from asd_jax.train import state as st  # noqa: E402
from asd_jax.train.steps import StepConfig, make_steps  # noqa: E402


def _config(preset: str, dtype: str, remat: str) -> wan.WanConfig:
  extra = dict(text_dim=32) if preset == "tiny" else {}
  # Layers unrolled: XLA's cost analysis counts a loop body once, whatever its trip count.
  return wan.WanConfig.preset(preset, dtype=dtype, remat_policy=remat, scan_layers=False, **extra)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--student", default="tiny")
  ap.add_argument("--teacher", default="tiny")
  ap.add_argument("--critic", default="tiny")
  ap.add_argument("--frames", type=int, default=6)
  ap.add_argument("--height", type=int, default=8)
  ap.add_argument("--width", type=int, default=8)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--text_len", type=int, default=512)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--ratio", default="1,4,1")
  ap.add_argument("--alpha", type=float, default=0.01)
  ap.add_argument("--peak_tflops", type=float, default=None)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  s_cfg = _config(args.student, args.dtype, args.remat)
  t_cfg = _config(args.teacher, args.dtype, args.remat)
  c_cfg = _config(args.critic, args.dtype, args.remat)
  keys = jax.random.split(jax.random.key(0), 5)
  student = jax.jit(wan.init_params, static_argnums=0)(s_cfg, keys[0])
  teacher = jax.jit(wan.init_params, static_argnums=0)(t_cfg, keys[1])
  critic = jax.jit(wan.init_params, static_argnums=0)(c_cfg, keys[2])
  taps = (12, 21, 29) if c_cfg.num_layers == 30 else tuple(range(min(2, c_cfg.num_layers)))
  h_cfg = disc.DiscConfig(dim=c_cfg.dim, taps=taps, num_heads=c_cfg.num_heads,
                          num_queries=4, mlp_dim=min(1024, 4 * c_cfg.dim), num_logits=3)
  tx = st.make_optimizer(2e-6)
  steps = make_steps(generator=wan.WanModel(s_cfg), critic=wan.WanModel(c_cfg),
                     teacher=wan.WanModel(t_cfg), teacher_params=teacher,
                     heads=disc.DiscHeads(h_cfg), gen_tx=tx, critic_tx=tx, heads_tx=tx,
                     cfg=StepConfig(timesteps=few_step_schedule(4),
                                    latent_shape=(args.frames, args.height, args.width,
                                                  s_cfg.in_channels), alpha=args.alpha))
  state = jax.jit(lambda k: st.init_state(student, critic, disc.init_heads(h_cfg, k),
                                          gen_tx=tx, critic_tx=tx, heads_tx=tx, rng=k))(keys[3])
  ctx = jax.random.normal(keys[4], (args.batch, args.text_len, s_cfg.text_dim))
  batch = {"context": ctx, "neg_context": ctx * 0.5}

  result = {
      "benchmark": "train_step",
      "device": {"jax": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                 "cpu_count": os.cpu_count(), "machine": platform.machine()},
      "config": {"student": args.student, "teacher": args.teacher, "critic": args.critic,
                 "latent": [args.frames, args.height, args.width], "batch": args.batch,
                 "dtype": args.dtype, "remat": args.remat, "ratio": args.ratio,
                 "alpha": args.alpha, "text_len": args.text_len},
      "flop_counter": "XLA HLO cost analysis of the compiled step (2 FLOPs per MAC, remat "
                      "recomputation included); layers are unrolled, but the loops over chunks "
                      "and the rollout's no-gradient steps are counted once each, so FLOPs, "
                      "TFLOP/s and MFU are lower bounds",
      "steps": {},
  }
  ratio = tuple(int(r) for r in args.ratio.split(","))
  cycle = 0.0
  for name, count in zip(("generator", "critic", "disc"), ratio):
    if count == 0:
      continue
    extra = () if name == "generator" else (jnp.int32(0),)
    compiled = jax.jit(steps[name]).lower(state, batch, *extra).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else None
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
      peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
              mem.alias_size_in_bytes)
    for _ in range(args.warmup):
      jax.block_until_ready(compiled(state, batch, *extra))
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state, batch, *extra))
      times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    cycle += count * sec
    entry = {"seconds": sec, "flops": flops, "peak_bytes": peak,
             "tflops_per_s": flops / sec / 1e12 if flops else None}
    if args.peak_tflops and flops:
      entry["mfu"] = flops / sec / 1e12 / args.peak_tflops
    result["steps"][name] = entry
    print(json.dumps({name: entry}), file=sys.stderr)
  result["cycle_seconds"] = cycle
  total_flops = sum(ratio[i] * (result["steps"].get(n, {}).get("flops") or 0.0)
                    for i, n in enumerate(("generator", "critic", "disc")))
  result["cycle_tflops_per_s"] = total_flops / cycle / 1e12 if cycle else None
  if args.peak_tflops:
    result["cycle_mfu"] = result["cycle_tflops_per_s"] / args.peak_tflops
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
