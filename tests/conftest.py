"""Test settings shared by every test: strict rank promotion, CPU, and the shared/ folder."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles many small programs: cheaper CPU code generation roughly halves its time
# (the float semantics XLA promises are the same; every comparison below has its tolerance).
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  if not SHARED.is_dir():
    pytest.skip(f"the shared/ folder is not at {SHARED}")
  return SHARED
