"""Run as a script: tiny training on one mesh; saves what the parameters moved by and the metrics.

Usage: python tests/train_mesh_equivalence.py STAGE DATA FSDP TENSOR WORKDIR OUT.npz
(XLA_FLAGS=--xla_force_host_platform_device_count=N must be set by the caller.)

The optimizer is set so that each update is linear in the gradient and moves parameters by
STEP x the gradient: AdamW with b1 = 0 updates by lr g / (|g| + eps) on its first step, which
is lr / eps * g when eps >> |g| (eps = 1e4; no weight decay, no clipping). Every mesh starts from
the same parameters (same seed, sharding-independent draws), so two meshes whose gradients differ
by dg end STEP x dg apart, instead of the ~5e-6 x sign(g) that the tiny config's learning rates
move parameters by. The metrics' gradient norms are saved too.
"""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asd_jax.train import loop  # noqa: E402

STEP = 1e-2  # lr / eps: parameters move by STEP * gradient


def config(stage, mesh):
  name = {"asd": "asd", "dmd": "self_forcing"}[stage]
  spec = importlib.util.spec_from_file_location("mesh_config", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.mesh_shape = mesh
  c.device_batch = 0
  c.batch_size = 4
  c.total_steps = 1
  if stage == "dmd":
    c.update_ratio = (1, 1, 0)
  c.progress = False
  c.export = False
  c.optim.eps = 1e4
  c.optim.gen_lr = c.optim.critic_lr = STEP * c.optim.eps
  if "heads_lr" in c.optim:
    c.optim.heads_lr = STEP * c.optim.eps
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1e9
  return c


def main():
  stage = sys.argv[1]
  data, fsdp, tensor = (int(a) for a in sys.argv[2:5])
  workdir, out = Path(sys.argv[5]), sys.argv[6]
  state = loop.train(config(stage, (data, fsdp, tensor)), workdir)
  leaves = {}
  for name in ("generator", "critic", "heads"):
    flat = jax.tree_util.tree_flatten_with_path(getattr(state, name))[0]
    for path, x in flat:
      if not x.is_fully_addressable:  # several processes: gather the other processes' shards
        x = multihost_utils.process_allgather(x, tiled=True)
      leaves[name + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(x))
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  leaves["metrics"] = np.asarray([record[k] for k in sorted(record) if k.endswith("grad_norm")])
  np.savez(out, **leaves)


if __name__ == "__main__":
  main()
