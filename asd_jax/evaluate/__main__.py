"""python -m asd_jax.evaluate {vbench, vbench-score, similarity, distances} [flags].

  vbench        --model_dir=DIR [--checkpoint=DIR] --out=DIR [--settings=4,2*,1*] [--prompts=F]
                [--samples=5] [--num_frames=81] [--seed=0] [--batch=4] [--num_shards --shard]
                (20-second videos: --num_frames=321 --cache_frames=21 --sink_frames=3)
  vbench-score  --videos=DIR [--dimensions=...] [--suite=standard|long] [--vbench_python=PY]
  similarity    --model_dir=DIR --prompts=F [--samples=2] [--setting=4] --out=DIR
  distances     --model_dir=DIR --prompts=F [--samples=8] [--teacher=DIR] [--features=mod:fn]
                --out=DIR

The model, size, dtype, cache and FFE-variant flags are `python -m asd_jax.sample`'s own.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from asd_jax import sample

# Flags taken over from `python -m asd_jax.sample` (the same actions: names, defaults, help).
SAMPLE_FLAGS = ("model_dir", "checkpoint", "vae", "text_encoder", "tokenizer", "training_steps",
                "shift", "ffe_variant", "num_frames", "height", "width", "cache_frames",
                "sink_frames", "seed", "dtype", "quiet")


def _with_sample_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  for action in sample.parser()._actions:  # pylint: disable=protected-access
    if action.dest in SAMPLE_FLAGS:
      p._add_action(action)  # pylint: disable=protected-access
  return p


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m asd_jax.evaluate",
                              description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)

  v = _with_sample_flags(sub.add_parser("vbench", help="VBench videos, one folder a setting"))
  v.add_argument("--out", required=True, help="folder of the setting folders and the manifest")
  v.add_argument("--settings", default="4,2*,1*", help="n (n steps) or n* (FFE), comma-separated")
  v.add_argument("--prompts", help="one prompt a line (default: VBench's standard suite)")
  v.add_argument("--samples", type=int, default=5, help="videos per prompt (VBench: 5)")
  v.add_argument("--batch", type=int, default=4, help="videos per sampler call")
  v.add_argument("--num_shards", type=int, default=None, help="default: jax.process_count()")
  v.add_argument("--shard", type=int, default=None, help="default: jax.process_index()")
  v.add_argument("--save_latents", action="store_true", help="also OUT/latents/SETTING/*.npy")

  s = sub.add_parser("vbench-score", help="VBench's evaluation and the weighted score tables")
  s.add_argument("--videos", required=True, help="an --out of `vbench`")
  s.add_argument("--out", help="results and tables (default: VIDEOS/vbench)")
  s.add_argument("--dimensions", help="comma-separated VBench dimensions (default: all 16)")
  s.add_argument("--suite", default="standard", choices=("standard", "long"),
                 help="VBench, or VBench-Long (vbench2_beta_long) for videos of 5 s and more")
  s.add_argument("--vbench_python", help="a Python that imports vbench (default: this one)")

  m = _with_sample_flags(sub.add_parser("similarity", help="x0 similarity between steps"))
  m.add_argument("--prompts", help="one prompt a line (default: VBench's standard suite)")
  m.add_argument("--samples", type=int, default=2, help="seeds (sample indices) per prompt")
  m.add_argument("--setting", default="4", help="n or n* (first and later chunks equally long)")
  m.add_argument("--batch", type=int, default=4)
  m.add_argument("--out", required=True)

  d = _with_sample_flags(sub.add_parser("distances", help="n vs n+1 step and teacher distances"))
  d.add_argument("--prompts", help="one prompt a line (default: VBench's standard suite)")
  d.add_argument("--samples", type=int, default=8, help="videos per prompt")
  d.add_argument("--batch", type=int, default=4)
  d.add_argument("--teacher", help="a converted bidirectional Wan DiT (the paper: 14B)")
  d.add_argument("--teacher_steps", type=int, default=50, help="Euler steps (the paper: 50)")
  d.add_argument("--teacher_guidance", type=float, default=5.0,
                 help="CFG scale on Wan's negative prompt (Wan 2.1's T2V default 5.0)")
  d.add_argument("--teacher_shift", type=float, default=5.0, help="timestep shift of its grid")
  d.add_argument("--features", help="module:function, uint8 videos [N,T,H,W,3] -> [N, D]")
  d.add_argument("--out", required=True)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  # Imported here so that `--help` and argument errors cost no JAX start-up.
  from asd_jax.evaluate import steps, vbench_scores, videos  # pylint: disable=g-import-not-at-top
  run = {"vbench": videos.generate_videos, "vbench-score": vbench_scores.score,
         "similarity": steps.step_similarity, "distances": steps.adjacent_distances}[args.command]
  try:
    result = run(args)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.command == "vbench-score":
    result = {k: v for k, v in result.items() if k != "tables"}
  if not getattr(args, "quiet", False):
    print(json.dumps(result, indent=1, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
