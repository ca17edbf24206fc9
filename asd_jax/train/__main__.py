"""python -m asd_jax.train --config=configs/NAME.py[:ARG] [--config.FIELD=VALUE ...] [--workdir=DIR]

The first line says whether the run starts fresh, resumes from step N, or has nothing left to do.
Exit codes (asd_jax.cli): 0 done; 1 failed (an `error: ...` line says why); 2 bad flags or config
(nothing created); 75 stopped early by a preemption notice (SIGTERM) after saving a checkpoint:
run the same command again to resume (the launch/ scripts do). `--debug` or ASD_JAX_DEBUG=1 shows
the traceback of an expected failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from absl import flags, logging
from ml_collections import config_flags

from asd_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "run directory (resumes from it)")
PROG = "python -m asd_jax.train"


def _flag_error(e: Exception) -> str:
  """The flag and the cause of a flag-parsing error (absl embeds a whole traceback in it)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  first = lines[0] if lines else type(e).__name__
  last = lines[-1] if len(lines) > 1 else ""
  if first.startswith("Unknown command line flag 'config."):
    first += " (no such config field; see asd_jax/train/config.py)"
  return first if not last or last in first else f"{first} {last}"


def parse(argv: Sequence[str]):
  """(config, workdir) from the command line, or a cli.UsageError (nothing is created)."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    flags.FLAGS([PROG, *argv])
  except (AttributeError, KeyError) as e:  # --config.FIELD=... names no field
    field = str(e).strip("\"'")
    raise cli.UsageError(f"no config field {field!r} in {config_arg} (its fields: "
                         f"asd_jax/train/config.py); check the --config.{field}... flag.") from None
  except OSError as e:  # the config file is missing or unreadable
    cause = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise cli.UsageError(f"--config={config_arg}: cannot load it ({cause}); e.g. "
                         f"--config=configs/toy.py.") from None
  except (flags.Error, ValueError, TypeError) as e:
    raise cli.UsageError(_flag_error(e)) from None
  if config_arg is None or _CONFIG.value is None:
    raise cli.UsageError("--config is required, e.g. --config=configs/toy.py:quick.")
  try:
    config = _CONFIG.value
    config.get("stage")  # a config file that failed to load raises on first use
  except (OSError, ValueError, KeyError) as e:
    cause = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise cli.UsageError(f"--config={config_arg}: cannot load it ({cause}); e.g. "
                         f"--config=configs/toy.py.") from None
  try:
    if "://" not in _WORKDIR.value:  # object stores (gs://...) are checked by their first write
      _checked_workdir(_WORKDIR.value)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  workdir = Path(_WORKDIR.value)  # as given: a relative workdir stays relative in records
  if config.stage != "toy":
    from asd_jax.train.loop import validate  # pylint: disable=g-import-not-at-top
    try:
      validate(config)
    except (ValueError, FileNotFoundError) as e:
      raise cli.UsageError(str(e)) from None
  return config, workdir


def _checked_workdir(path: str) -> Path:
  from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
  workdir = atomic.check_writable_dir(path, "--workdir")
  if workdir.is_dir():
    for sub in ("checkpoints", "export"):
      if (workdir / sub).exists() and not (workdir / sub).is_dir():
        raise atomic.DestinationError(f"--workdir {workdir}: {workdir / sub} is a file; this is "
                                      f"not a training workdir.")
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise atomic.DestinationError(f"--workdir {workdir} is not writable; choose another.")
  return workdir


def status_line(config, workdir: Path) -> str:
  """Whether a run starts fresh, resumes from step N, or has nothing left to do."""
  if config.stage == "toy":
    stages = sorted(p.name for p in workdir.iterdir()
                    if (p / "export" / "config.json").is_file()) if workdir.is_dir() else []
    if not (workdir.is_dir() and any(p.is_dir() for p in workdir.iterdir())):
      return f"train: toy pipeline, starting fresh in {workdir}"
    done = f"stages done: {', '.join(stages)}" if stages else "no stage done yet"
    return f"train: toy pipeline, resuming in {workdir} ({done})"
  from asd_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  return f"train: {config.stage}, " + checkpoint.start_status(
      workdir / "checkpoints", int(config.total_steps), export=bool(config.get("export", True)))


def _main(argv: Sequence[str]) -> int:
  config, workdir = parse(argv)
  print(status_line(config, workdir), file=sys.stderr, flush=True)
  logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every write at INFO
  from asd_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if config.stage == "toy":  # the toy pipeline runs every stage through the loop below
    from asd_jax.toy.pipeline import run  # pylint: disable=g-import-not-at-top
  else:
    from asd_jax.train.loop import train as run  # pylint: disable=g-import-not-at-top
  try:
    run(config, str(workdir))
  except RuntimeError:
    if not checkpoint.preempted():  # the toy pipeline stops with a RuntimeError then
      raise
  if checkpoint.preempted():
    print(f"train: stopped early by a preemption notice (SIGTERM) after saving a checkpoint in "
          f"{workdir}; run the same command to resume (exit {cli.EXIT_PREEMPTED}).",
          file=sys.stderr, flush=True)
    return cli.EXIT_PREEMPTED
  return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
