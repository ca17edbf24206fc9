"""Sharded training equals single-device training (fake CPU devices, subprocesses).

Each run (tests/train_mesh_equivalence.py) makes one update-ratio cycle from the same initial
parameters with an optimizer set so that every parameter moves by 1e-2 x its gradient (see the
script), so two meshes whose gradients differ by dg end 1e-2 x dg apart: the comparison below is
one of gradients, at their own scale (the tiny config's learning rates moved parameters by
~5e-6, under the old 2e-5 tolerance, so a wrong sharded gradient passed). The tolerance, 1e-6
absolute + 1e-5 relative, covers float32 rounding of the parameters and of the differently ordered
sharded sums.

The default suite runs FSDP over two devices on the DMD stage; the slow test runs the ASD stage
on data, FSDP and tensor parallel meshes of eight devices.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent / "train_mesh_equivalence.py"
MOVED = 1e-3  # each network's moves (L2 norm) must exceed this


def _run(stage, mesh, devices, tmp_path):
  name = f"{stage}_{'x'.join(map(str, mesh))}"
  out = tmp_path / f"{name}.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             f" --xla_force_host_platform_device_count={devices}")
  r = subprocess.run([sys.executable, str(SCRIPT), stage, *map(str, mesh), str(tmp_path / name),
                      str(out)], capture_output=True, text=True, timeout=1800, env=env,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return dict(np.load(out))


def _compare(reference, got, initial_moves, label):
  assert got.keys() == reference.keys()
  np.testing.assert_allclose(got["metrics"], reference["metrics"], rtol=1e-4, err_msg=label)
  worst = max(float(np.max(np.abs(got[k] - reference[k]))) for k in reference)
  print(f"{label}: moves (L2) >= {initial_moves:.2e}, max abs difference {worst:.2e}")
  for k in reference:
    np.testing.assert_allclose(got[k], reference[k], atol=1e-6, rtol=1e-5, err_msg=f"{label} {k}")


def _moves(run):
  """The smallest over the networks of the L2 norm of their moves: the script's STEP (1e-2) x
  the gradient's global norm (the metrics' *_grad_norm)."""
  return float(np.min(run["metrics"])) * 1e-2


def test_fsdp_on_two_devices_equals_one_device(tmp_path):
  reference = _run("dmd", (1, 1, 1), 1, tmp_path)
  moved = _moves(reference)
  assert moved > MOVED, moved
  _compare(reference, _run("dmd", (1, 2, 1), 2, tmp_path), moved, "dmd (1, 2, 1)")


@pytest.mark.slow
def test_meshes_give_the_same_parameters(tmp_path):
  reference = _run("asd", (1, 1, 1), 1, tmp_path)
  moved = _moves(reference)
  assert moved > MOVED, moved
  for mesh in ((8, 1, 1), (2, 4, 1), (1, 4, 2)):
    _compare(reference, _run("asd", mesh, 8, tmp_path), moved, f"asd {mesh}")
