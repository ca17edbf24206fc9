"""The toy-world pipeline: teacher -> ODE initialisation -> distillation runs -> evaluation -> report.

`run(config, workdir)` (what `python -m asd_jax.train --config=configs/toy.py` calls) derives one
ordinary stage config per stage from the toy config and runs each with the real training loop:

  WORKDIR/teacher    stage 'pretrain': a bidirectional Wan trained by flow matching on the world
  WORKDIR/ode_init   stage 'ode_init': the causal student, started from the pretrained net (as the
                     real one starts from Wan 1.3B), regressed on teacher ODE pairs
  WORKDIR/<run>      stage 'dmd' or 'asd' from that one initialisation and the same seed
  WORKDIR/results.json, WORKDIR/report.md

A stage whose export exists is done and skipped; an interrupted one resumes from its checkpoint.
With `pipeline.teacher = 'analytic'` the exact velocity is the teacher (ODE pairs, DMD's real
score); the pretrained net then only initialises the critic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from asd_jax.diffusion import warp_timesteps
from asd_jax.toy import evaluate as ev

EXPORT = "export"


def run_alpha(name: str, default_alpha: float) -> tuple[str, float]:
  """('dmd' | 'asd', alpha) of a run name: 'dmd', 'asd' or 'asd@0.03'.

  'asd@0' is the ASD stage with alpha 0: the Self Forcing generator trained beside a
  discriminator it ignores, with the update ratio, batches and draws of every other 'asd@A' run
  (the paired baseline of an ablation); 'dmd' is the Self Forcing stage itself (ratio g:c:0).
  """
  if name == "dmd":
    return "dmd", 0.0
  if name == "asd":
    return "asd", float(default_alpha)
  if name.startswith("asd@"):
    try:
      alpha = float(name[4:])
    except ValueError:
      alpha = -1.0
    if alpha >= 0:
      return "asd", alpha
  raise ValueError(f"unknown run {name!r}: use 'dmd', 'asd' or 'asd@ALPHA' (ALPHA >= 0).")


def stage_config(c: ml_collections.ConfigDict, stage: str, *, teacher_dir: str = "",
                 student_dir: str = "", alpha: float = 0.0) -> ml_collections.ConfigDict:
  """The ordinary single-stage config of one pipeline stage."""
  s = ml_collections.ConfigDict(c.to_dict())
  p = c.pipeline
  s.stage = stage
  s.asd.alpha = alpha
  s.init.student = student_dir
  analytic = p.teacher == "analytic"
  if stage == "pretrain":
    s.models.student = ml_collections.ConfigDict(c.models.teacher.to_dict())
    s.init.teacher = s.init.critic = ""
    t = p.teacher_net
    s.total_steps, s.batch_size, s.ema.start = t.total_steps, t.batch_size, t.ema_start
    s.optim.gen_lr, s.optim.b1 = t.lr, t.b1
    return s
  if analytic:
    s.models.teacher = ml_collections.ConfigDict(dict(preset="analytic"))
  s.init.teacher = "" if analytic else teacher_dir
  s.init.critic = teacher_dir
  if stage == "ode_init":
    o = p.ode_init
    if o.from_teacher and not student_dir:
      # As the real pipeline starts the causal student from the bidirectional Wan (1.3B), the toy
      # starts it from the pretrained bidirectional net, which must then share its architecture.
      if c.models.student.to_dict() != c.models.teacher.to_dict():
        raise ValueError("pipeline.ode_init.from_teacher needs models.student == models.teacher "
                         "(the student starts from the pretrained teacher net); set it False to "
                         "start the student from random weights.")
      s.init.student = teacher_dir
    s.total_steps, s.batch_size = o.total_steps, o.batch_size
    s.optim.gen_lr, s.optim.b1 = o.lr, o.b1
  else:
    d = p.distill
    s.total_steps, s.batch_size = d.total_steps, d.batch_size
    s.optim.gen_lr, s.optim.critic_lr = d.gen_lr, d.critic_lr
    if stage == "dmd":  # the baseline: the same generator and critic updates, no discriminator
      s.update_ratio = tuple(c.update_ratio[:2]) + (0,)
  return s


def run_stage(cfg: ml_collections.ConfigDict, workdir: Path, log=print) -> str:
  """Trains one stage in `workdir` unless its export exists; returns the export directory."""
  from asd_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  export = workdir / EXPORT
  if (export / "config.json").exists():
    log(f"{workdir.name}: done before ({export})")
    return str(export)
  log(f"{workdir.name}: stage {cfg.stage}, {cfg.total_steps} steps, batch {cfg.batch_size}")
  t0 = time.perf_counter()
  train(cfg, workdir)
  if not (export / "config.json").exists():
    raise RuntimeError(f"{workdir.name} stopped before its last step (preempted?); run the same "
                       f"command again to resume it.")
  log(f"{workdir.name}: {time.perf_counter() - t0:.0f} s")
  return str(export)


def run(config: ml_collections.ConfigDict, workdir: str | Path, log=print,
        show_report: bool = True) -> dict[str, Any]:
  """Runs every stage (skipping finished ones), evaluates, writes results.json and report.md."""
  from asd_jax import pretrained  # pylint: disable=g-import-not-at-top
  from asd_jax.train.loop import toy_world  # pylint: disable=g-import-not-at-top
  from asd_jax.toy.config import validate  # pylint: disable=g-import-not-at-top
  c = config
  validate(c)  # every field, and every stage config derived from them, before any stage runs
  runs = [(name,) + run_alpha(name, c.asd.alpha) for name in c.pipeline.runs]
  workdir = Path(workdir)
  t_start = time.perf_counter()
  timing = {}

  def timed(name, fn):
    t0 = time.perf_counter()
    out = fn()
    timing[name] = time.perf_counter() - t0
    return out

  teacher_dir = c.pipeline.teacher_dir or timed(
      "teacher", lambda: run_stage(stage_config(c, "pretrain"), workdir / "teacher", log))
  ode_dir = c.pipeline.get("ode_dir") or timed("ode_init", lambda: run_stage(
      stage_config(c, "ode_init", teacher_dir=teacher_dir), workdir / "ode_init", log))
  run_dirs = {}
  for name, stage, alpha in runs:
    cfg = stage_config(c, stage, teacher_dir=teacher_dir, student_dir=ode_dir, alpha=alpha)
    run_dirs[name] = timed(name, lambda cfg=cfg, name=name: run_stage(cfg, workdir / name, log))

  t0 = time.perf_counter()
  world = toy_world(c)
  training = warp_timesteps(c.timesteps, c.shift)
  n, seed = c.pipeline.eval_samples, c.pipeline.eval_seed
  reference = ev.true_samples(world, n, seed + 1)
  results: dict[str, Any] = {"config": c.to_dict(), "training_timesteps": list(training)}
  results["data"] = ev.score(world, ev.true_samples(world, n, seed + 2), reference, c.chunk_frames)
  if c.pipeline.teacher == "analytic":
    from asd_jax.toy.teacher import AnalyticTeacher  # pylint: disable=g-import-not-at-top
    t_module, t_params = AnalyticTeacher(world), {}
  else:
    t_module, t_params = pretrained.load(teacher_dir)
  teacher_x = ev.sample_teacher(t_module, t_params, world, samples=n, seed=seed,
                                steps=c.pipeline.teacher_steps, shift=c.shift,
                                guidance=c.ode.guidance)
  results["teacher"] = ev.score(world, teacher_x, reference, c.chunk_frames)
  results["runs"] = {}
  for name in ["ode_init"] + list(run_dirs):
    module, params = pretrained.load(ode_dir if name == "ode_init" else run_dirs[name])
    r = ev.evaluate_generator(module, params, world, training, samples=n, seed=seed,
                              reference=reference, teacher_samples=teacher_x,
                              chunk_frames=c.chunk_frames)
    if name != "ode_init":
      r["training"] = ev.training_curves(workdir / name)
    results["runs"][name] = r
  timing["evaluation"] = time.perf_counter() - t0
  timing["total"] = time.perf_counter() - t_start
  results["seconds"] = timing
  from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
  atomic.write_text(workdir / "results.json", json.dumps(results, indent=1))
  report = render_report(results)
  atomic.write_text(workdir / "report.md", report)
  if show_report:
    log(report)
  return results


METRICS = ("nll_per_dim", "precision", "coverage", "temporal_consistency", "energy_distance")
HEADER = ("NLL/dim (lower better)", "precision", "coverage", "temporal consistency",
          "energy distance (lower better)")


def _row(name: str, m: dict[str, float]) -> str:
  return f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |"


def render_report(results: dict[str, Any]) -> str:
  """A short markdown report of one pipeline run."""
  lines = ["# Toy world: one pipeline run", ""]
  secs = results.get("seconds", {})
  if secs:
    lines += ["Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()), ""]
  lines += ["| generator @ steps | " + " | ".join(HEADER) + " |",
            "|---" * (len(HEADER) + 1) + "|",
            _row("true data (floor)", results["data"]), _row("teacher", results["teacher"])]
  for name, r in results["runs"].items():
    for sched, m in r["schedules"].items():
      lines.append(_row(f"{name} @ {sched}", m))
  lines.append("")
  for name, r in results["runs"].items():
    sim = r["step_similarity"]
    first = np.asarray(sim["first"])
    later = np.asarray(sim["later"])
    off = ~np.eye(len(first), dtype=bool)
    adj = r["adjacent"]
    line = (f"- {name}: mean x0 cosine similarity across steps, first chunk "
            f"{first[off].mean():.3f}, later chunks {later[off].mean():.3f}; energy distance "
            f"n->n+1 {_fmt(adj['n_to_next'])}")
    if "n_to_teacher" in adj:
      line += f", n->teacher {_fmt(adj['n_to_teacher'])}"
    if "training" in r:
      tr = r["training"]
      line += (f"; DMD loss mean {tr['dmd_loss_mean']:.4f}, variance {tr['dmd_loss_var']:.2e}")
    lines.append(line)
  return "\n".join(lines) + "\n"


def _fmt(values) -> str:
  return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
