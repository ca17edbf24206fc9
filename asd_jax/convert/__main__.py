"""python -m asd_jax.convert wan|export-wan ... (see API.md and asd_jax/convert/wan.py)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Further commands live in their own modules, each with HELP, add_arguments(parser) and
# run(args) -> int; a command whose module does not exist yet answers "not implemented yet".
_MODULE_COMMANDS = {
    "vae": "asd_jax.convert.vae",
    "umt5": "asd_jax.convert.umt5",
    "release": "asd_jax.convert.release",
}


def _module_for(command: str):
  name = _MODULE_COMMANDS[command]
  return importlib.import_module(name) if importlib.util.find_spec(name) else None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m asd_jax.convert",
      description="Convert PyTorch checkpoints into asd_jax Orbax checkpoints, and back.")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  w = sub.add_parser("wan", help="Wan 2.1 DiT -> DIR/config.json + DIR/params (Orbax).")
  w.add_argument("--src", required=True,
                 help="safetensors file, *.safetensors.index.json, .pt/.pth (plain or training "
                      "checkpoint), or a diffusers / original Wan model directory.")
  w.add_argument("--dst", required=True, help="output directory (must be absent or empty).")
  w.add_argument("--format", default="auto", choices=("auto", "original", "diffusers", "training"),
                 help="key naming (original/diffusers), or 'training' for a checkpoint with "
                      "generator/generator_ema/critic sub-dicts. Default: detect.")
  w.add_argument("--key", default=None,
                 help="sub-dict of a training checkpoint (default: generator_ema, then generator, "
                      "model, ema, state_dict, module, net, critic).")
  w.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="stored param dtype.")
  w.add_argument("--num_heads", type=int, default=None,
                 help="attention heads when no config.json says (default dim // 128).")
  w.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst.")
  w.add_argument("--quiet", action="store_true", help="no notes or progress bar.")

  e = sub.add_parser("export-wan",
                     help="DIR written by `wan` (or a training export) -> original-key safetensors.")
  e.add_argument("--src", required=True, help="directory with config.json and params/.")
  e.add_argument("--dst", required=True, help="the .safetensors file to write.")
  e.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="cast on export (default: keep the stored dtype).")
  e.add_argument("--overwrite", action="store_true", help="replace an existing --dst.")
  e.add_argument("--quiet", action="store_true")

  for command in _MODULE_COMMANDS:
    module = _module_for(command)
    if module is None:
      sub.add_parser(command, help="not implemented yet.")
    else:
      module.add_arguments(sub.add_parser(command, help=module.HELP))
  return p


def main(argv: list[str] | None = None) -> int:
  """The command line: 0 done, 1 refused or failed (the `error: ...` line says why; nothing is
  left at --dst), 2 bad flags. `--debug` (or ASD_JAX_DEBUG=1) shows tracebacks."""
  from asd_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  parser = _parser()
  args, unknown = parser.parse_known_args(argv)
  module = _module_for(args.command) if args.command in _MODULE_COMMANDS else None
  if args.command in _MODULE_COMMANDS and module is None:
    print(f"error: `convert {args.command}` is not implemented yet.", file=sys.stderr)
    return 2
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  # Imported here so that --help answers without loading jax.
  from asd_jax.convert import wan  # pylint: disable=g-import-not-at-top
  if getattr(args, "num_heads", None) is not None and args.num_heads < 1:
    parser.error(f"--num_heads must be >= 1, got {args.num_heads}.")
  if module is not None:
    return module.run(args)
  if args.command == "wan":
    wan.convert(args.src, args.dst, fmt=args.format, key=args.key, dtype=args.dtype,
                num_heads=args.num_heads, overwrite=args.overwrite, verbose=not args.quiet)
  else:
    wan.export_wan(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                   verbose=not args.quiet)
  return 0


if __name__ == "__main__":
  sys.exit(main())
