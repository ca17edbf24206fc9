"""What every command line of the project shares: `error: ...` lines, exit codes, known noise.

  sys.exit(cli.run(main))   # main(argv) -> int

Expected failures (bad flags, missing or damaged inputs, a full or read-only disk) end with one
`error: ...` message on stderr and no traceback; `--debug` on the command line (anywhere) or
ASD_JAX_DEBUG=1 in the environment shows the traceback instead. Anything else is a bug and keeps
its traceback.

Exit codes: 0 done, 1 failed (the message says why), 2 bad input (nothing was created),
75 stopped early by a preemption notice (SIGTERM) after saving: run the same command again to
resume (75 is sysexits' EX_TEMPFAIL; the launch/ scripts re-run on it), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
DEBUG_ENV = "ASD_JAX_DEBUG"
DEBUG_FLAG = "--debug"


class UsageError(ValueError):
  """A command-line flag is wrong; the message names the flag and what to give instead."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def quiet_known_noise() -> None:
  """Drops warnings that say nothing is wrong.

  JAX warns "os.fork() was called ..." whenever a subprocess starts (the mp4 writer's ffmpeg): the
  child runs exec straight away, so the deadlock it warns of cannot happen.
  """
  warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)


def expected_errors() -> tuple[type[BaseException], ...]:
  """Failures a person can act on from the message alone (FloatingPointError: a training run
  stopped by its non-finite guard, `asd_jax.train.metrics.NonFiniteError`)."""
  return (ValueError, OSError, NotImplementedError, FloatingPointError)


def message(e: BaseException) -> str:
  """The text after `error: ` for an expected failure."""
  if isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename is None and e.strerror:
    return e.strerror  # a message of our own (a free-space check), figures included
  if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno is not None:
    from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
    return atomic.describe_os_error(e)
  if isinstance(e, FileNotFoundError) and not e.args[1:] and e.args:
    return str(e.args[0])
  text = str(e) or type(e).__name__
  return text


def print_error(text: str) -> None:
  print(f"error: {text}", file=sys.stderr, flush=True)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        usage_errors: tuple[type[BaseException], ...] = (UsageError,),
        failure_code: int = EXIT_FAILED) -> int:
  """Calls `main(argv without --debug)` and turns expected failures into `error: ...` lines.

  Args:
    main: the CLI's main; returns an exit code (None: 0).
    argv: the arguments (default sys.argv[1:]).
    usage_errors: exception types answered with exit code 2 (bad input).
    failure_code: the exit code of the other expected failures.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(argv)
  argv = [a for a in argv if a != DEBUG_FLAG]
  quiet_known_noise()
  try:
    code = main(argv)
  except KeyboardInterrupt:
    if debug:
      raise
    print_error("interrupted; outputs being written were discarded, earlier ones kept.")
    return EXIT_INTERRUPTED
  except expected_errors() as e:
    if debug:
      raise
    print_error(message(e))
    return EXIT_USAGE if isinstance(e, usage_errors) else failure_code
  return EXIT_OK if code is None else int(code)


def positive(value: int | float | None, flag: str, *, allow_none: bool = False,
             minimum: int | float = 1) -> None:
  """Refuses `value < minimum` for `flag` with a UsageError."""
  if value is None and allow_none:
    return
  if value is None or value < minimum:
    raise UsageError(f"{flag} must be >= {minimum}, got {value}.")


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
  """`app.run(main, flags_parser=cli.parse_absl_flags)`: an unknown or malformed flag is one
  `error:` line and exit status 2, not absl's usage dump."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
