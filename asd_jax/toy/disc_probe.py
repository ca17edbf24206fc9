"""Can the discriminator learn? Its held-out AUC with the generator frozen, per setting.

  python -m asd_jax.toy.disc_probe --workdir=DIR [--heads_lr=1e-4,1e-3] \
      [--t_law=dmd,schedule,uniform] [--r_form=eq6] [--steps=300] [--every=50]

Before an ablation can say anything about ASD, its discriminator must tell n-step from
(n+1)-step samples. This trains fresh heads on the frozen ODE-initialised student of the toy
pipeline (the teacher net and the ODE initialisation of `asd_jax.toy.config:ablation`, made or
found under DIR) with the ASD stage's own programs (`train.programs.build_programs`: the D step,
its optimizer, the held-out AUC of `train.disc_auc.DiscAuc`), for every combination of the
heads' learning rate, the noise law and the R1/R2 form, and writes DIR/probe.json and a table.
Only D steps run (the generator and critic never update); D step j draws its batch from the
discriminator's stream and its noise from index j.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags

from asd_jax.toy import pipeline
from asd_jax.toy.config import get_config


def probe(c: ml_collections.ConfigDict, teacher_dir: str, student_dir: str, *, steps: int,
          every: int, log=lambda s: print(s, flush=True)) -> dict[str, Any]:
  """Trains the heads of the stage config of `c` (an ASD stage) for `steps` D steps against the
  frozen student; returns {'step': [...], 'auc': {n: [...]}, 'seconds': s}."""
  from asd_jax.models import disc  # pylint: disable=g-import-not-at-top
  from asd_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
  from asd_jax.train.data import make_source  # pylint: disable=g-import-not-at-top
  from asd_jax.train.disc_auc import DiscAuc  # pylint: disable=g-import-not-at-top
  from asd_jax.train.loop import _params_or_init, toy_world  # pylint: disable=g-import-not-at-top
  from asd_jax.train.config import validate  # pylint: disable=g-import-not-at-top
  from asd_jax.train.programs import build_programs, heads_logical  # pylint: disable=g-import-not-at-top
  from asd_jax.train.steps import DISC_STREAM  # pylint: disable=g-import-not-at-top
  s = pipeline.stage_config(c, "asd", teacher_dir=teacher_dir, student_dir=student_dir, alpha=0.0)
  validate(s)
  world = toy_world(s)
  mesh = shd.make_mesh(tuple(s.mesh_shape))
  rules = shd.DEFAULT_RULES
  k_gen, k_critic, _, k_heads, k_run = jax.random.split(jax.random.key(s.seed), 5)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    progs = build_programs(s, mesh, rules, world=world)
    generator = _params_or_init(s.init.student, progs.student_cfg, k_gen, mesh, rules)
    critic = _params_or_init(s.init.critic, progs.critic_cfg, k_critic, mesh, rules)
    heads = shd.shard_init(lambda k: disc.init_heads(progs.heads_cfg, k), mesh,
                           heads_logical(progs.heads_cfg), rules, args=(k_heads,))
    state = progs.init(k_run, generator, critic, heads)
    teacher_params = ({} if progs.teacher_cfg is None else  # the analytic teacher has none
                      _params_or_init(s.init.teacher, progs.teacher_cfg, k_gen, mesh, rules))
    source = make_source(s, teacher=progs.teacher, teacher_params=teacher_params,
                         timesteps=progs.timesteps, latent=progs.latent, world=world)
    watch = DiscAuc(progs.disc_auc, source, rows=progs.auc_rows, batch_size=s.batch_size,
                    samples=s.asd.auc_samples, every=every, patience=s.asd.auc_patience,
                    mesh=mesh, rules=rules)
    out = {"step": [], "auc": {}, "logit_gap": [], "disc_loss": []}

    def record(j, metrics=None):
      a = watch(teacher_params, state)
      out["step"].append(j)
      for k, v in a.items():
        if k.startswith("disc_auc/n"):
          out["auc"].setdefault(k[len("disc_auc/n"):], []).append(v)
      log(f"    D step {j}: AUC " + " ".join(f"{v:.3f}" for k, v in a.items()
                                            if k.startswith("disc_auc/n"))
          + (f", logit gap {float(metrics['disc_logit_gap']):.3f}" if metrics else ""))

    record(0)
    for j in range(steps):
      batch = shd.global_batch(source(DISC_STREAM + j), mesh, rules)
      state, metrics = progs.steps["disc"](teacher_params, state, batch, jax.numpy.int32(j))
      out["logit_gap"].append(float(metrics["disc_logit_gap"]))
      out["disc_loss"].append(float(metrics["disc_loss"]))
      if (j + 1) % every == 0 or j + 1 == steps:
        record(j + 1, metrics)
  out["chance_band"] = watch.band
  out["pool"] = watch.samples
  out["seconds"] = time.perf_counter() - t0
  return out


_WORKDIR = flags.DEFINE_string("workdir", None, "directory of the teacher net and the ODE "
                               "initialisation (made there when missing) and of probe.json")
_LR = flags.DEFINE_list("heads_lr", ["1e-4", "1e-3"], "heads learning rates")
_LAW = flags.DEFINE_list("t_law", ["dmd", "schedule", "uniform"], "ASD noise laws")
_FORM = flags.DEFINE_list("r_form", ["eq6"], "R1/R2 forms")
_STEPS = flags.DEFINE_integer("steps", 300, "discriminator steps per setting")
_EVERY = flags.DEFINE_integer("every", 50, "AUC evaluated every N D steps")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the heads' init and the draws")
_CONFIG_ARG = flags.DEFINE_string("config_arg", "ablation", "argument of asd_jax/toy/config.py")


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  c = get_config(_CONFIG_ARG.value or None)
  c.progress = False
  c.seed = _SEED.value
  teacher = pipeline.run_stage(pipeline.stage_config(c, "pretrain"), workdir / "teacher")
  student = pipeline.run_stage(pipeline.stage_config(c, "ode_init", teacher_dir=teacher),
                               workdir / "ode_init")
  path = workdir / "probe.json"
  results = json.loads(path.read_text()) if path.exists() else {}
  for lr, law, form in itertools.product(_LR.value, _LAW.value, _FORM.value):
    name = f"lr={float(lr):g},t_law={law},r_form={form},steps={_STEPS.value},seed={_SEED.value}"
    if name in results:
      continue
    cs = ml_collections.ConfigDict(c.to_dict())
    cs.optim.heads_lr, cs.asd.t_law, cs.asd.r_form = float(lr), law, form
    print(f"== {name}", flush=True)
    results[name] = probe(cs, teacher, student, steps=_STEPS.value, every=_EVERY.value)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
  print("| setting | AUC n=1 | n=2 | n=3 (final) | chance band |\n|---|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | " + " | ".join(f"{v[-1]:.3f}" for v in r["auc"].values())
          + f" | 0.5 ± {r['chance_band']:.3f} |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
