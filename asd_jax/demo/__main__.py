"""python -m asd_jax.demo: a local web page that streams a video as each chunk decodes.

  python -m asd_jax.demo --model_dir=DIR [--checkpoint=DIR] [--host=127.0.0.1] [--port=7860]
  python -m asd_jax.demo --toy=runs/toy [--toy_run=asd]

`--model_dir` holds the parts `python -m asd_jax.convert release` writes (`--checkpoint` replaces
the generator, e.g. a distilled export), read as `python -m asd_jax.sample` reads them; `--toy` is a
toy-world pipeline workdir (`python -m asd_jax.train --config=configs/toy.py --workdir=DIR`) whose
distilled student is shown class by class, channels as colour. Needs the demo extra:
`pip install -e ".[demo]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from asd_jax import cli


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m asd_jax.demo", description=__doc__.split("\n")[0])
  p.add_argument("--model_dir", help="converted parts: dit/, vae/, umt5/, tokenizer/")
  p.add_argument("--checkpoint", help="generator directory (replaces model_dir/dit)")
  p.add_argument("--vae", help="VAE directory (replaces model_dir/vae)")
  p.add_argument("--text_encoder", help="umT5 directory (replaces model_dir/umt5)")
  p.add_argument("--tokenizer", help="tokenizer directory (replaces model_dir/tokenizer)")
  p.add_argument("--toy", help="a toy-world pipeline workdir (instead of --model_dir)")
  p.add_argument("--toy_run", default="asd", help="which of its distilled students (DIR/RUN/export)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (0.0.0.0 opens the demo to the network)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=832)
  p.add_argument("--max_frames", type=int, default=None,
                 help="longest video the page offers (default 321 video frames, 4 x 81; toy: "
                      "4 x the world's frames)")
  p.add_argument("--cache_frames", type=int, default=None,
                 help="latent frames in the KV cache; longer videos roll it (default: 21 = 81 "
                      "video frames, the trained length; toy: the world's frames)")
  p.add_argument("--sink_frames", type=int, default=0, help="frames kept when the window rolls")
  p.add_argument("--training_steps", type=int, default=4,
                 help="length of the warped schedule the generator was trained on")
  p.add_argument("--shift", type=float, default=5.0, help="timestep shift of that schedule")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--measure", type=int, default=0, metavar="N",
                 help="instead of serving: time N generations of each setting through the "
                      "server's engine and print JSON (first-chunk latency, frames per second)")
  p.add_argument("--frames", type=int, default=0, help="video frames --measure generates "
                 "(default: the longest the page offers)")
  return p


def check(args: argparse.Namespace) -> None:
  """Rejects impossible flags before anything is loaded."""
  if bool(args.toy) == bool(args.model_dir or args.checkpoint):
    raise cli.UsageError("give either --model_dir (and/or --checkpoint, --vae, ...) or --toy.")
  if not 0 < args.port < 65536:
    raise cli.UsageError(f"--port must be in 1..65535, got {args.port}.")
  if args.cache_frames is not None and args.cache_frames < 3 + max(args.sink_frames, 0):
    raise cli.UsageError(f"--cache_frames must hold the {args.sink_frames} sink frames and a "
                         f"3-frame chunk, got {args.cache_frames}.")
  if args.sink_frames < 0 or args.sink_frames % 3:
    raise cli.UsageError(f"--sink_frames must be a non-negative multiple of 3, got "
                         f"{args.sink_frames}.")
  if args.max_frames is not None and args.max_frames < 1:
    raise cli.UsageError(f"--max_frames must be positive, got {args.max_frames}.")
  if args.measure < 0:
    raise cli.UsageError(f"--measure must be >= 0, got {args.measure}.")


def build_engine(args: argparse.Namespace):
  from asd_jax import sample  # pylint: disable=g-import-not-at-top
  from asd_jax.demo import engine  # pylint: disable=g-import-not-at-top
  from asd_jax.diffusion import few_step_schedule  # pylint: disable=g-import-not-at-top
  if args.toy:
    return engine.load_toy(args.toy, args.toy_run, max_latent_frames=args.max_frames,
                           cache_frames=args.cache_frames, sink_frames=args.sink_frames)
  parts = sample.resolve_parts(args)
  models = sample.load_models(parts, args.dtype)
  return engine.WanEngine(models, few_step_schedule(args.training_steps, args.shift),
                          height=args.height, width=args.width, max_frames=args.max_frames or 321,
                          cache_frames=21 if args.cache_frames is None else args.cache_frames,
                          sink_frames=args.sink_frames)


def measure(eng, repeats: int, frames: int) -> dict:
  """Times `repeats` generations of every setting (after one that compiles), as the server runs
  them: seconds from the sampler's start to the first chunk's frames, and frames per second."""
  import statistics  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  frames = frames or eng.frame_options()[-1]
  out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
         "cpus": os.cpu_count(), "kind": eng.kind, "frames": frames,
         "frame_size": list(eng.frame_size()), "video_fps": eng.fps,
         "cache_frames": eng.cache_frames, "settings": {}}
  for setting in eng.describe()["settings"]:
    raw = {"setting": setting, "frames": frames, "seed": 0, "prompt": "a red cat", "class": 0}
    spec = eng.validate(raw)
    compile_s = eng.generate(spec).compile_s
    runs = [eng.generate(eng.validate({**raw, "seed": i + 1})) for i in range(repeats)]
    fps = [r.fps for r in runs]
    lat = [r.first_chunk_s for r in runs]
    out["settings"][setting] = {
        "compile_s": compile_s, "fps_median": statistics.median(fps), "fps_min": min(fps),
        "fps_max": max(fps), "first_chunk_s_median": statistics.median(lat),
        "first_chunk_s_max": max(lat), "repeats": repeats}
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  check(args)
  if args.measure:
    print(json.dumps(measure(build_engine(args), args.measure, args.frames), indent=1))
    return 0
  try:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cli.UsageError("the demo needs aiohttp: pip install -e \".[demo]\"") from None
  from asd_jax.demo.server import make_app  # pylint: disable=g-import-not-at-top
  eng = build_engine(args)
  print(f"asd_jax demo ({eng.kind}): http://{args.host}:{args.port}/ (Ctrl-C to stop)",
        file=sys.stderr)
  web.run_app(make_app(eng), host=args.host, port=args.port, print=None)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
