"""Test settings shared by every test: strict rank promotion, CPU, and the shared/ folder."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles many small programs: cheaper CPU code generation roughly halves its time
# (the float semantics XLA promises are the same; every comparison below has its tolerance).
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

# One persistent compilation cache for the whole run, inherited by the CLIs the tests start as
# subprocesses: a program compiled once (the same tiny sampler, train step, converter) is read back
# by every later test and process instead of being compiled again. Set JAX_COMPILATION_CACHE_DIR
# to choose the folder (or to share it between runs).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.path.join(tempfile.gettempdir(), f"asd_jax_tests_{os.getuid()}_{os.getpid()}")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_OWN_CACHE, "jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  if not SHARED.is_dir():
    pytest.skip(f"the shared/ folder is not at {SHARED}")
  return SHARED
