"""Run as a script: tiny ASD training on one mesh; prints a digest of the final params as JSON.

Usage: python tests/train_mesh_equivalence.py DATA FSDP TENSOR WORKDIR OUT.npz
(XLA_FLAGS=--xla_force_host_platform_device_count=N must be set by the caller.)
"""

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asd_jax.train import loop  # noqa: E402


def main():
  data, fsdp, tensor = (int(a) for a in sys.argv[1:4])
  workdir, out = sys.argv[4], sys.argv[5]
  spec = importlib.util.spec_from_file_location("asd_config", REPO / "configs" / "asd.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.mesh_shape = (data, fsdp, tensor)
  c.batch_size = 8
  c.total_steps = 2
  c.progress = False
  c.export = False
  state = loop.train(c, workdir)
  leaves = {}
  for name in ("generator", "generator_ema", "critic", "heads"):
    flat = jax.tree_util.tree_flatten_with_path(getattr(state, name))[0]
    for path, x in flat:
      leaves[name + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(x))
  np.savez(out, **leaves)


if __name__ == "__main__":
  main()
