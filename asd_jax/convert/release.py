"""`python -m asd_jax.convert release`: a whole official Wan 2.1 release folder -> a `--model_dir`.

The release folder holds the DiT (`diffusion_pytorch_model*.safetensors`, sharded with an index
for the 14B, plus `config.json`), `Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` and the
`google/umt5-xxl` tokenizer folder. The output holds `dit/`, `vae/`, `umt5/` and `tokenizer/`, the
layout `python -m asd_jax.sample --model_dir` reads. Every part is checked for presence before
anything is converted, and the output appears only once all four parts are done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from asd_jax.convert.common import ConversionError, atomic_directory, check_destination
from asd_jax.io import atomic

HELP = "a Wan 2.1 release folder (DiT, VAE, umT5, tokenizer) -> DIR/{dit,vae,umt5,tokenizer}."
VAE_FILE = "Wan2.1_VAE.pth"
UMT5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = os.path.join("google", "umt5-xxl")


def find_parts(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> dict:
  """Paths of the four parts in a release folder, or a ConversionError listing what is missing."""
  src = Path(src)
  if not src.is_dir():
    raise ConversionError(f"--src {src} is not a directory (give the Wan 2.1 release folder).")
  parts = {"dit": src, "vae": src / VAE_FILE, "umt5": src / UMT5_FILE,
           "tokenizer": Path(tokenizer) if tokenizer else src / TOKENIZER_DIR}
  missing = []
  if not (list(src.glob("diffusion_pytorch_model*.safetensors")) or
          list(src.glob("diffusion_pytorch_model*.safetensors.index.json"))):
    missing.append(f"dit: no diffusion_pytorch_model*.safetensors in {src}")
  for name in ("vae", "umt5"):
    if not parts[name].is_file():
      missing.append(f"{name}: {parts[name]}")
  if not (parts["tokenizer"].is_dir() and any(parts["tokenizer"].iterdir())):
    missing.append(f"tokenizer: {parts['tokenizer']} (a folder; or pass --tokenizer)")
  if missing:
    raise ConversionError(f"{src} is not a complete Wan 2.1 release; missing:\n  " +
                          "\n  ".join(missing))
  return parts


def _bytes(path: Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_space(dst: Path, parts: dict, dit_dtype: str) -> int:
  """Refuses to start when the disk at `dst` cannot hold the release's conversion.

  The estimate: the DiT's params in `dit_dtype` (from the safetensors headers) and the VAE and
  umT5 at their source sizes, each twice (the memory-mapped staging copy and the Orbax output
  exist together while a part is written), plus the tokenizer. Returns the bytes needed.
  """
  from asd_jax.io import sources  # pylint: disable=g-import-not-at-top
  reader = sources.open_checkpoint(parts["dit"], log=lambda m: None).reader
  itemsize = 2 if dit_dtype == "bfloat16" else 4
  dit = sum(int(np.prod(reader.shape(k), dtype=np.int64)) * itemsize for k in reader.keys())
  need = 2 * (dit + _bytes(parts["vae"]) + _bytes(parts["umt5"])) + _bytes(parts["tokenizer"])
  try:
    atomic.check_free_space(dst, need, "the release conversion")
  except atomic.DestinationError as e:
    raise ConversionError(str(e)) from None
  return need


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, tokenizer: str | None = None,
            dit_dtype: str = "float32", overwrite: bool = False, verbose: bool = True) -> Path:
  """Converts every part of a release folder into `dst` (atomically). Returns `dst`."""
  from asd_jax.convert import umt5 as umt5_convert  # pylint: disable=g-import-not-at-top
  from asd_jax.convert import vae as vae_convert  # pylint: disable=g-import-not-at-top
  from asd_jax.convert import wan as wan_convert  # pylint: disable=g-import-not-at-top
  parts = find_parts(src, tokenizer)
  dst = check_destination(dst, overwrite, src=src)
  if tokenizer:
    check_destination(dst, overwrite, src=tokenizer)
  log = (lambda m: print(m, file=sys.stderr)) if verbose else (lambda m: None)
  check_space(dst, parts, dit_dtype)
  with atomic_directory(dst) as tmp:
    log("[1/4] DiT")
    wan_convert.convert(parts["dit"], tmp / "dit", fmt="original", dtype=dit_dtype,
                        verbose=verbose)
    log("[2/4] VAE")
    vae_convert.convert(parts["vae"], tmp / "vae", dtype="float32", verbose=verbose)
    log("[3/4] umT5")
    umt5_convert.convert(parts["umt5"], tmp / "umt5", verbose=verbose)
    log("[4/4] tokenizer")
    shutil.copytree(parts["tokenizer"], tmp / "tokenizer")
  log(f"wrote {dst}")
  return dst


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--src", required=True, help="the Wan 2.1 release folder.")
  p.add_argument("--dst", required=True, help="output directory (must be absent or empty).")
  p.add_argument("--tokenizer", default=None,
                 help=f"tokenizer folder (default: SRC/{TOKENIZER_DIR}).")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="stored dtype of the DiT params.")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst.")
  p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
  convert(args.src, args.dst, tokenizer=args.tokenizer, dit_dtype=args.dtype,
          overwrite=args.overwrite, verbose=not args.quiet)
  return 0
