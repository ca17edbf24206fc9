"""The command line of the ODE-pair builder (`python -m asd_jax.data.ode_pairs --help`).

    python -m asd_jax.data.ode_pairs --prompts=data/prompts --teacher=ckpt/dit --out=data/ode \
        [--num_examples=N] [--frames=21 --height=60 --width=104] [--steps=48] [--shift=5] \
        [--guidance=6] [--training_timesteps=1000,750,500,250] [--seed=0] [--batch_size=1] \
        [--dtype=bfloat16] [--store_dtype=bfloat16] [--resume]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from asd_jax.data.ode_pairs.layout import DEFAULT_NAME
from asd_jax.data.ode_pairs.layout import STORE_DTYPES
from asd_jax.data.ode_pairs.reader import OdePairDataset
from asd_jax.data.ode_pairs.writer import build_ode_pairs


def parser() -> argparse.ArgumentParser:
  """The builder's flags (the planner's `--ode_pairs` reads its settings through them too)."""
  p = argparse.ArgumentParser(prog="python -m asd_jax.data.ode_pairs",
                              description="Generate teacher ODE pairs for the ODE initialisation.")
  p.add_argument("--prompts", required=True, help="prompt dataset (python -m asd_jax.data.build).")
  p.add_argument("--teacher", required=True, help="converted Wan DiT (python -m asd_jax.convert).")
  p.add_argument("--out", required=True, help="dataset directory to create (absent or empty).")
  p.add_argument("--num_examples", type=int, default=None,
                 help="default: one per prompt; more cycle through the prompts.")
  p.add_argument("--frames", type=int, default=21, help="latent frames F.")
  p.add_argument("--height", type=int, default=60, help="latent height H.")
  p.add_argument("--width", type=int, default=104, help="latent width W.")
  p.add_argument("--steps", type=int, default=48, help="teacher Euler steps.")
  p.add_argument("--shift", type=float, default=5.0, help="timestep shift of the grid.")
  p.add_argument("--guidance", type=float, default=6.0, help="CFG weight (negative prompt).")
  p.add_argument("--training_timesteps", default="1000,750,500,250",
                 help="unwarped; warped with --shift they must be grid points.")
  p.add_argument("--seed", type=int, default=0, help="noise seed in [0, 2^31).")
  p.add_argument("--batch_size", type=int, default=1, help="examples per teacher call.")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="teacher compute dtype.")
  p.add_argument("--param_dtype", default=None, choices=("bfloat16", "float32"),
                 help="cast the teacher's params on load (default: as stored).")
  p.add_argument("--store_dtype", default="bfloat16", choices=STORE_DTYPES,
                 help="dtype of the stored latents.")
  p.add_argument("--examples_per_shard", type=int, default=None,
                 help="default: about 1 GiB per shard.")
  p.add_argument("--name", default=DEFAULT_NAME, help="TFDS dataset name.")
  p.add_argument("--resume", action="store_true",
                 help="continue an interrupted build of --out (same settings).")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a non-empty --out once the new build is complete.")
  p.add_argument("--quiet", action="store_true", help="no progress bar.")
  return p



def main(argv: Sequence[str] | None = None) -> int:
  """The command line: 0 done, 2 bad input (nothing created), 1 a failure while generating.
  `--debug` (or ASD_JAX_DEBUG=1) shows the traceback of an expected failure."""
  from asd_jax import cli as cli_lib  # pylint: disable=g-import-not-at-top
  return cli_lib.run(_main, argv, usage_errors=(ValueError, FileNotFoundError))


def check_args(args: argparse.Namespace) -> list[float]:
  """Checks the solve's settings of parsed flags; returns the training timesteps.

  Raises:
    cli.UsageError: with what to give instead.
  """
  from asd_jax import cli as cli_lib  # pylint: disable=g-import-not-at-top
  try:
    timesteps = [float(t) for t in args.training_timesteps.replace(" ", "").split(",") if t]
  except ValueError:
    raise cli_lib.UsageError(f"--training_timesteps must be comma-separated numbers, got "
                             f"{args.training_timesteps!r}.") from None
  if args.steps < 1:
    raise cli_lib.UsageError(f"--steps must be >= 1, got {args.steps}.")
  if not args.shift > 0 or not np.isfinite(args.shift):
    raise cli_lib.UsageError(f"--shift must be a finite number > 0, got {args.shift}.")
  if not args.guidance >= 0 or not np.isfinite(args.guidance):
    raise cli_lib.UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}.")
  return timesteps


def _main(argv: Sequence[str]) -> int:
  from asd_jax import cli as cli_lib  # pylint: disable=g-import-not-at-top
  args = parser().parse_args(argv)
  timesteps = check_args(args)
  from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
  for flag in ("prompts", "teacher"):
    try:
      atomic.check_disjoint(getattr(args, flag), args.out, f"--{flag}", "--out")
    except atomic.DestinationError as e:
      raise cli_lib.UsageError(str(e)) from None
  out = build_ode_pairs(
      args.prompts, args.teacher, args.out, num_examples=args.num_examples, frames=args.frames,
      height=args.height, width=args.width, steps=args.steps, shift=args.shift,
      guidance_scale=args.guidance, training_timesteps=timesteps, seed=args.seed,
      batch_size=args.batch_size, dtype=args.dtype, param_dtype=args.param_dtype,
      store_dtype=args.store_dtype, examples_per_shard=args.examples_per_shard, name=args.name,
      resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
  print(f"wrote {OdePairDataset(out)!r}", file=sys.stderr)
  return 0
