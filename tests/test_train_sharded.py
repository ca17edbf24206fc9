"""Sharded training equals single-device training (8 fake CPU devices, subprocesses).

Slow (four tiny training runs, each compiling its own steps): `python -m pytest -m slow`.
Tolerance: 2e-5 absolute + 1e-4 relative on float32 params after 2 ASD cycles — sharded
reductions (FSDP gathers, tensor-parallel partial sums) change the float summation order, so
bit-equality is not expected; a wrong sharding shows up as O(1e-2) or larger differences.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent / "train_mesh_equivalence.py"


def _run(mesh, devices, tmp_path):
  out = tmp_path / f"{'x'.join(map(str, mesh))}.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             f" --xla_force_host_platform_device_count={devices}")
  r = subprocess.run([sys.executable, str(SCRIPT), *map(str, mesh), str(tmp_path / out.stem),
                      str(out)], capture_output=True, text=True, timeout=900, env=env,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return dict(np.load(out))


@pytest.mark.slow
def test_meshes_give_the_same_parameters(tmp_path):
  reference = _run((1, 1, 1), 1, tmp_path)
  for mesh in ((8, 1, 1), (2, 4, 1), (1, 4, 2)):
    got = _run(mesh, 8, tmp_path)
    assert got.keys() == reference.keys()
    worst = max(float(np.max(np.abs(got[k] - reference[k]))) for k in reference)
    print(f"mesh {mesh}: max abs difference {worst:.2e}")
    for k in reference:
      np.testing.assert_allclose(got[k], reference[k], atol=2e-5, rtol=1e-4, err_msg=f"{mesh} {k}")
