"""Test settings shared by every test: strict rank promotion, CPU, and the shared/ folder."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  if not SHARED.is_dir():
    pytest.skip(f"the shared/ folder is not at {SHARED}")
  return SHARED
