"""The paper's ablation on the toy world, as paired arms over seeds: `python -m asd_jax.toy.ablation`.

  python -m asd_jax.toy.ablation --workdir=DIR [--seeds=0,1,2,3] [--alphas=0.1,0.3,1]

One teacher net is pretrained (with the analytic teacher it only initialises the student and the
critic) and one causal student ODE-initialised (`--shared_init`, the default; else one per
seed); then for every seed the toy pipeline (`asd_jax.toy.pipeline.run`) distils from that
initialisation the arms 'asd@0' (the baseline: the ASD stage with alpha 0, so the Self Forcing
generator beside a discriminator it ignores) and 'asd@A' for every A of --alphas, and evaluates
each. The arms of a seed are paired: the same update ratio, batches, noise and random draws
(`asd_jax.train.steps`: the ASD-only draws have their own key stream and the batches do not
depend on the discriminator's updates), so an arm's difference to the baseline of its own seed is
the effect of alpha alone. The report gives, per arm, the per-seed paired differences with their
mean, 95% t-interval, p-value and the smallest effect the test had 80% power to detect:

  primary    exact NLL/dim at 1 and 2 steps without FFE
  secondary  NLL/dim with FFE (1*, 2*), energy distance, coverage, the n -> n+1 distance
  also       the discriminator's held-out AUC per n during training, FFE's trade (NLL against
             energy distance, n* - n within each generator) and the prefix against the spread FFE

  DIR/report.md, DIR/summary.json (every number, per seed), DIR/*.png, DIR/videos/*.mp4

Finished stages are skipped, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags

from asd_jax.toy import pipeline
from asd_jax.toy.config import get_config

METRICS = pipeline.METRICS
NAMES = {"nll_per_dim": "NLL/dim", "precision": "precision", "coverage": "coverage",
         "temporal_consistency": "temporal consistency", "energy_distance": "energy distance"}
BASELINE = "asd@0"
PRIMARY = (("nll_per_dim", "1"), ("nll_per_dim", "2"))
SECONDARY = (("nll_per_dim", "1*"), ("nll_per_dim", "2*"), ("energy_distance", "1"),
             ("energy_distance", "2"), ("energy_distance", "1*"), ("energy_distance", "2*"),
             ("coverage", "1"), ("coverage", "2"), ("temporal_consistency", "1"),
             ("temporal_consistency", "2"))


def arm_names(alphas) -> list[str]:
  """The baseline and one arm per alpha > 0, as pipeline run names."""
  return [BASELINE] + [f"asd@{float(a):g}" for a in alphas if float(a) != 0.0]


def _mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _fmt(values, digits: int = 3) -> str:
  m, s = _mean_std(values)
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def paired(diffs) -> dict[str, Any]:
  """Paired statistics of per-seed differences: mean, standard deviation, 95% t-interval,
  two-sided p-value of the paired t-test, and `mde80`: the true mean difference this many seeds
  would detect (p < 0.05) with 80% power, given the observed spread."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = np.asarray(diffs, np.float64)
  n = len(d)
  out = {"diffs": d.tolist(), "n": n, "mean": float(np.mean(d))}
  if n < 2:
    return {**out, "sd": float("nan"), "ci95": [float("nan")] * 2, "p": float("nan"),
            "mde80": float("nan")}
  sd = float(np.std(d, ddof=1))
  se = sd / math.sqrt(n)
  t975, t80 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.80, n - 1)
  p = float(2 * stats.t.sf(abs(out["mean"]) / se, n - 1)) if se > 0 else float("nan")
  return {**out, "sd": sd, "ci95": [out["mean"] - t975 * se, out["mean"] + t975 * se], "p": p,
          "mde80": float((t975 + t80) * se)}


def run_all(c, workdir: Path, seeds, alphas, *, shared_init: bool = True,
            log=print) -> list[dict[str, Any]]:
  """Runs (or finds) every seed's arms; returns their results (each with its wall time)."""
  runs = arm_names(alphas)
  teacher = pipeline.run_stage(pipeline.stage_config(c, "pretrain"), workdir / "teacher", log)
  ode = ""
  if shared_init:
    ode = pipeline.run_stage(pipeline.stage_config(c, "ode_init", teacher_dir=teacher),
                             workdir / "ode_init", log)
  results = []
  for seed in seeds:
    cs = ml_collections.ConfigDict(c.to_dict())
    cs.seed = int(seed)
    cs.pipeline.teacher_dir = teacher
    cs.pipeline.ode_dir = ode
    cs.pipeline.runs = tuple(runs)
    t0 = time.perf_counter()
    log(f"== seed {seed}")
    results.append(pipeline.run(cs, workdir / f"seed_{seed}", log=lambda s: log(f"  {s}"),
                                show_report=False))
    log(f"== seed {seed}: {time.perf_counter() - t0:.0f} s")
  return results


# ----------------------------------------------------------------------------------------------
# Aggregation.


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
  """Every aggregated number of the report, as lists over seeds, and the paired differences."""
  runs = [r for r in results[0]["runs"] if r != "ode_init"]
  per = lambda f: [f(r) for r in results]  # noqa: E731
  s: dict[str, Any] = {"seeds": [r["config"]["seed"] for r in results], "runs": runs}
  s["alpha"] = {run: pipeline.run_alpha(run, 0.0)[1] for run in runs}
  s["data"] = {k: per(lambda r, k=k: r["data"][k]) for k in METRICS}
  s["teacher"] = {k: per(lambda r, k=k: r["teacher"][k]) for k in METRICS}
  every = ["ode_init"] + runs
  s["schedules"] = {
      run: {sched: {k: per(lambda r, run=run, sched=sched, k=k: r["runs"][run]["schedules"][sched][k])
                    for k in METRICS}
            for sched in results[0]["runs"][run]["schedules"]}
      for run in every}
  s["step_similarity"] = {run: {part: np.mean([r["runs"][run]["step_similarity"][part]
                                               for r in results], axis=0).tolist()
                                for part in ("first", "later")} for run in every}
  s["step_similarity_offdiag"] = {
      run: {part: per(lambda r, run=run, part=part: _offdiag(r["runs"][run]["step_similarity"][part]))
            for part in ("first", "later")} for run in every}
  s["adjacent"] = {run: {k: per(lambda r, run=run, k=k: r["runs"][run]["adjacent"][k])
                         for k in ("n_to_next", "n_to_teacher")} for run in every}
  s["training"] = {run: {k: per(lambda r, run=run, k=k: r["runs"][run]["training"][k])
                         for k in ("dmd_loss_mean", "dmd_loss_var", "dmd_loss",
                                   "disc_logit_gap", "disc_auc", "step")}
                   for run in runs}
  s["seconds"] = per(lambda r: r.get("seconds", {}))
  # Paired differences arm - baseline, seed by seed.
  if BASELINE in runs:
    base = s["schedules"][BASELINE]
    s["paired"] = {}
    for run in runs:
      if run == BASELINE:
        continue
      arm = s["schedules"][run]
      d = {f"{k}@{sched}": paired(np.subtract(arm[sched][k], base[sched][k]))
           for k, sched in PRIMARY + SECONDARY}
      nxt = np.subtract(s["adjacent"][run]["n_to_next"], s["adjacent"][BASELINE]["n_to_next"])
      for i in range(nxt.shape[1]):
        d[f"n_to_next@{i + 1}"] = paired(nxt[:, i])
      s["paired"][run] = d
  # FFE's trade and the two FFE variants, within each generator (n* - n; spread - prefix).
  s["ffe"] = {}
  for run in runs:
    m = s["schedules"][run]
    f = {}
    for n in ("1", "2"):
      for k in ("nll_per_dim", "energy_distance", "temporal_consistency"):
        f[f"{k}@{n}*-{n}"] = paired(np.subtract(m[n + "*"][k], m[n][k]))
    for k in ("nll_per_dim", "energy_distance"):
      if "2*/spread" in m:
        f[f"{k}@2*/spread-2*"] = paired(np.subtract(m["2*/spread"][k], m["2*"][k]))
    s["ffe"][run] = f
  return s


def _offdiag(m) -> float:
  m = np.asarray(m)
  return float(m[~np.eye(len(m), dtype=bool)].mean())


def final_auc(training: dict[str, Any]) -> dict[str, list[float]]:
  """The last logged held-out AUC per n, per seed ({n: [seeds]})."""
  out: dict[str, list[float]] = {}
  for per_seed in training["disc_auc"]:
    for n, a in per_seed.items():
      out.setdefault(n, []).append(a["auc"][-1] if a["auc"] else float("nan"))
  return out


def _pfmt(st: dict[str, Any], digits: int = 3) -> str:
  lo, hi = st["ci95"]
  return (f"{st['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] | p {st['p']:.2f} | "
          f"{st['mde80']:.{digits}f} | " + ", ".join(f"{v:+.{digits}f}" for v in st["diffs"]))


def render(s: dict[str, Any], header: str = "") -> str:
  """report.md of the aggregated numbers."""
  runs, seeds = s["runs"], s["seeds"]
  sch = s["schedules"]
  L = [f"# Toy-world ablation: paired arms over {len(seeds)} seeds ({', '.join(map(str, seeds))})",
       ""]
  if header:
    L += [header, ""]
  if "paired" in s:
    L += ["## Primary endpoint: paired difference to the baseline (alpha 0)", "",
          "Per seed: arm minus the alpha-0 arm of the same seed (same batches, noise and draws). "
          "Negative NLL differences favour ASD. CI: 95% t-interval over seeds; mde80: the true "
          "difference this test would detect with 80% power at the observed spread.", "",
          "| arm | endpoint | mean diff [95% CI] | p | mde80 | per seed |", "|---|---|---|---|---|---|"]
    for run, d in s["paired"].items():
      for k, sched in PRIMARY:
        L.append(f"| {run} | {NAMES[k]} @ {sched} | " + _pfmt(d[f"{k}@{sched}"]) + " |")
    L += ["", "## Secondary endpoints (same pairing)", "",
          "| arm | endpoint | mean diff [95% CI] | p | mde80 | per seed |", "|---|---|---|---|---|---|"]
    for run, d in s["paired"].items():
      for k, sched in SECONDARY:
        L.append(f"| {run} | {NAMES[k]} @ {sched} | " + _pfmt(d[f"{k}@{sched}"]) + " |")
      for key in sorted(k for k in d if k.startswith("n_to_next@")):
        n = int(key.split("@")[1])
        L.append(f"| {run} | energy distance {n} -> {n + 1} steps | " + _pfmt(d[key]) + " |")
    L.append("")
  ns = sorted({n for run in runs for n in final_auc(s["training"][run])})
  L += ["## The discriminator: held-out AUC at the end of training", "",
        "AUC of D_n at telling n-step from (n+1)-step samples of the current generator, on a "
        "fixed held-out pool (mean ± sd over seeds; 0.5 is chance).", "",
        "| arm | " + " | ".join(f"n = {n}" for n in ns) + " | mean logit gap |",
        "|---" * (2 + len(ns)) + "|"]
  for run in runs:
    t = s["training"][run]
    fa = final_auc(t)
    if not fa:
      continue  # no discriminator (the 'dmd' stage)
    gaps = [np.nanmean(g) for g in t["disc_logit_gap"]]
    L.append(f"| {run} | " + " | ".join(_fmt(fa[n]) if n in fa else "n/a" for n in ns)
             + f" | {_fmt(gaps)} |")
  L += ["", "## FFE's trade and the two FFE variants (within each generator)", "",
        "n* - n: the first chunk takes all 4 steps instead of n. spread - prefix: 2* with the "
        "later chunks at (1000, 833.3) instead of (1000, 937.5).", "",
        "| generator | difference | mean [95% CI] | p | mde80 | per seed |", "|---|---|---|---|---|---|"]
  for run in runs:
    for key, st in s["ffe"][run].items():
      L.append(f"| {run} | {key} | " + _pfmt(st) + " |")
  L += ["", "## Every schedule (mean ± sd over seeds)", "",
        "| generator @ steps | " + " | ".join(NAMES[k] for k in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|"]
  L.append("| true data (floor) | " + " | ".join(_fmt(s["data"][k]) for k in METRICS) + " |")
  L.append("| teacher | " + " | ".join(_fmt(s["teacher"][k]) for k in METRICS) + " |")
  for run in ["ode_init"] + runs:
    for name, m in sch[run].items():
      L.append(f"| {run} @ {name} | " + " | ".join(_fmt(m[k]) for k in METRICS) + " |")
  L += ["", "## Fig. 4: cosine similarity of predicted x0 across the 4 steps", "",
        "| generator | first chunk | later chunks |", "|---|---|---|"]
  for run in ["ode_init"] + runs:
    o = s["step_similarity_offdiag"][run]
    L.append(f"| {run} | {_fmt(o['first'])} | {_fmt(o['later'])} |")
  L += ["", "## Table 3: energy distance between step-n samples and step n+1 / the teacher", "",
        "| generator | comparison | step 1 | step 2 | step 3 | step 4 |", "|---|---|---|---|---|---|"]
  for run in ["ode_init"] + runs:
    a = s["adjacent"][run]
    nxt = np.asarray(a["n_to_next"])
    tea = np.asarray(a["n_to_teacher"])
    L.append(f"| {run} | n -> n+1 | " + " | ".join(_fmt(nxt[:, i]) for i in range(nxt.shape[1]))
             + " | n/a |")
    L.append(f"| {run} | n -> teacher | " + " | ".join(_fmt(tea[:, i])
                                                        for i in range(tea.shape[1])) + " |")
  L += ["", "## DMD loss during training (last 80% of the updates)", "",
        "| generator | DMD loss mean | DMD loss variance |", "|---|---|---|"]
  for run in runs:
    t = s["training"][run]
    L.append(f"| {run} | {_fmt(t['dmd_loss_mean'], 4)} | {_fmt(t['dmd_loss_var'], 6)} |")
  L += ["", "## Wall time per seed (this machine)", "", "| seed | " + " | ".join(
      ["teacher", "ode_init"] + runs + ["evaluation", "total"]) + " |",
        "|---" * (len(runs) + 5) + "|"]
  for seed, secs in zip(seeds, s["seconds"]):
    L.append(f"| {seed} | " + " | ".join(
        f"{secs[k]:.0f} s" if k in secs else "shared" for k in
        ["teacher", "ode_init"] + runs + ["evaluation", "total"]) + " |")
  L.append("")
  return "\n".join(L)


# ----------------------------------------------------------------------------------------------
# Plots and videos.


def plots(s: dict[str, Any], out: Path) -> list[Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  runs = s["runs"]
  # Fig. 4
  shown = [r for r in ("ode_init", BASELINE, runs[-1]) if r in s["step_similarity"]]
  fig, axes = plt.subplots(len(shown), 2, figsize=(6.4, 3.0 * len(shown)), squeeze=False)
  for i, run in enumerate(shown):
    for j, part in enumerate(("first", "later")):
      m = np.asarray(s["step_similarity"][run][part])
      ax = axes[i, j]
      im = ax.imshow(m, vmin=min(0.0, m.min()), vmax=1.0, cmap="viridis")
      for (a, b), v in np.ndenumerate(m):
        ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
      ax.set_title(f"{run}: {part} chunk{'s' if part == 'later' else ''}")
      ax.set_xticks(range(len(m)), [str(k + 1) for k in range(len(m))])
      ax.set_yticks(range(len(m)), [str(k + 1) for k in range(len(m))])
      fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  written.append(_save(fig, out / "step_similarity.png"))
  # Fig. 11 as paired differences: arm - baseline, mean and 95% CI over seeds.
  if s.get("paired"):
    arms = list(s["paired"])
    x = np.arange(len(arms))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("nll_per_dim", "energy_distance")):
      for k, sched in enumerate(("1", "2", "1*", "2*")):
        st = [s["paired"][a][f"{metric}@{sched}"] for a in arms]
        mean = np.array([v["mean"] for v in st])
        err = np.array([[v["mean"] - v["ci95"][0] for v in st], [v["ci95"][1] - v["mean"]
                                                                   for v in st]])
        ax.errorbar(x + 0.08 * (k - 1.5), mean, yerr=err, marker="o", capsize=3,
                    label=f"{sched} steps")
      ax.axhline(0.0, color="k", lw=0.5)
      ax.set_xticks(x, [f"{s['alpha'][a]:g}" for a in arms])
      ax.set_xlabel("alpha")
      ax.set_ylabel(f"{NAMES[metric]}: arm - alpha 0")
      ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "alpha_sweep.png"))
  # Figs. 13-14: DMD loss; the discriminator's held-out AUC.
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for run in runs:
    t = s["training"][run]
    loss = np.mean(np.asarray(t["dmd_loss"], np.float64), axis=0)
    axes[0].plot(t["step"][0], loss, label=f"{run}", lw=0.8)
    aucs = t["disc_auc"]
    for n in sorted(aucs[0]):
      steps = aucs[0][n]["step"]
      mean = np.mean([a[n]["auc"] for a in aucs], axis=0)
      axes[1].plot(steps, mean, marker=".", lw=0.8, label=f"{run}, n = {n}")
  axes[0].set_xlabel("generator update")
  axes[0].set_ylabel("DMD loss (mean of seeds)")
  axes[0].legend(fontsize=7)
  axes[1].axhline(0.5, color="k", lw=0.5)
  axes[1].set_xlabel("generator update")
  axes[1].set_ylabel("held-out AUC of D_n (mean of seeds)")
  axes[1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  written.append(_save(fig, out / "training.png"))
  return written


def _save(fig, path: Path) -> Path:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def render_frames(world, x: np.ndarray, scale: int = 8) -> np.ndarray:
  """Latent videos [n, F, H, W, C] -> uint8 frames [F, H * scale, n * W * scale, 3], side by side
  (channels 0-2 as RGB, scaled by the world's largest mode value)."""
  top = float(np.max(np.abs(world.modes)))
  rgb = np.clip(x[..., :3] / top, -1.0, 1.0)
  img = np.round((rgb + 1.0) * 127.5).astype(np.uint8)  # [n, F, H, W, 3]
  img = img.repeat(scale, axis=2).repeat(scale, axis=3)
  return np.concatenate(list(img), axis=2)  # [F, H*s, n*W*s, 3]


def videos(c, workdir: Path, out: Path, seed: int, runs) -> list[Path]:
  """mp4s of one sample per class: the data, and the runs `runs` at 4, 2* and 1* steps."""
  from asd_jax import pretrained  # pylint: disable=g-import-not-at-top
  from asd_jax.diffusion import warp_timesteps  # pylint: disable=g-import-not-at-top
  from asd_jax.sample import write_mp4  # pylint: disable=g-import-not-at-top
  from asd_jax.toy import evaluate as ev  # pylint: disable=g-import-not-at-top
  from asd_jax.train.loop import toy_world  # pylint: disable=g-import-not-at-top
  world = toy_world(c)
  out.mkdir(parents=True, exist_ok=True)
  written = []

  def write(name, x):
    frames = render_frames(world, x[:, 0])
    path = out / f"{name}.mp4"
    write_mp4(path, iter([frames]), frames.shape[1:3], fps=3)
    written.append(path)

  write("data", ev.true_samples(world, 1, seed))
  training = warp_timesteps(c.timesteps, c.shift)
  table = {name: (first, later) for name, first, later in ev.schedules(training)}
  for run in runs:
    export = workdir / f"seed_{seed}" / run / pipeline.EXPORT
    if not export.exists():
      continue
    module, params = pretrained.load(export)
    for sched in ("4", "2*", "1*"):
      x = ev.sample_generator(module, params, world, *table[sched], samples=1, seed=seed)
      write(f"{run.replace('@', '_')}_{sched.replace('*', 'star')}", x)
  return written


# ----------------------------------------------------------------------------------------------
# CLI.

_WORKDIR = flags.DEFINE_string("workdir", None, "ablation directory (an interrupted one continues)")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3"], "seeds of the paired arms")
_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "0.3", "1"],
                            "ASD weights of the arms (besides alpha 0, the baseline, always run)")
_SHARED_INIT = flags.DEFINE_bool("shared_init", True, "one ODE initialisation (the config's "
                                 "seed) for every seed; False: one per seed")
_STEPS = flags.DEFINE_integer("distill_steps", 0, "generator updates of every arm (0: the "
                              "config's pipeline.distill.total_steps)")
_EVAL = flags.DEFINE_integer("eval_samples", 0, "evaluation samples per class (0: the config's)")
_AUC_EVERY = flags.DEFINE_integer("auc_every", -1, "the discriminator's held-out AUC every N "
                                  "updates (-1: the config's asd.auc_every)")
_CONFIG_ARG = flags.DEFINE_string("config_arg", "ablation", "argument of the toy config "
                                  "(asd_jax/toy/config.py): 'ablation' (the analytic teacher and the "
                                  "ablation's budgets), 'analytic' (the quick start's budgets), "
                                  "'' (the trained teacher), 'quick'")


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  workdir = Path(_WORKDIR.value)
  if workdir.exists() and not workdir.is_dir():
    _refuse(f"--workdir {workdir} is a file; give a directory.")
  try:
    c = get_config(_CONFIG_ARG.value or None)
  except ValueError as e:
    _refuse(f"--config_arg: {e}")
  c.progress = False
  if _STEPS.value:
    c.pipeline.distill.total_steps = _STEPS.value
  if _EVAL.value:
    c.pipeline.eval_samples = _EVAL.value
  if _AUC_EVERY.value >= 0:
    c.asd.auc_every = _AUC_EVERY.value
  try:
    alphas = [float(a) for a in _ALPHAS.value]
    seeds = [int(v) for v in _SEEDS.value]
  except ValueError as e:
    _refuse(f"--alphas and --seeds take comma-separated numbers ({e}).")
  if any(a <= 0 for a in alphas) or len(set(alphas)) != len(alphas):
    _refuse("--alphas must be distinct and positive (alpha 0, the baseline, always "
                         "runs).")
  if len(set(seeds)) != len(seeds) or not seeds:
    _refuse("--seeds must be distinct integers.")
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  results = run_all(c, workdir, seeds, alphas, shared_init=_SHARED_INIT.value)
  s = summarise(results)
  header = (f"Budget: {c.pipeline.distill.total_steps} generator updates per arm (ratio "
            f"{':'.join(map(str, c.update_ratio))}, batch {c.pipeline.distill.batch_size}), "
            f"{c.pipeline.eval_samples} evaluation samples per class; heads lr "
            f"{c.optim.heads_lr:g}, ASD noise law '{c.asd.t_law}', R1/R2 form '{c.asd.r_form}'; "
            f"ODE initialisation {'shared by the seeds' if _SHARED_INIT.value else 'per seed'}.")
  _write(workdir / "summary.json", json.dumps(s, indent=1))
  report = render(s, header)
  _write(workdir / "report.md", report)
  plots(s, workdir)
  videos(c, workdir, workdir / "videos", seeds[0], [BASELINE, arm_names(alphas)[-1]])
  print(report)
  print(f"ablation: {time.perf_counter() - t0:.0f} s; {workdir / 'report.md'}")


def _refuse(message: str) -> None:
  """A bad flag: one `error: ...` line and exit status 2, before anything is created."""
  from asd_jax import cli  # pylint: disable=g-import-not-at-top
  cli.print_error(message)
  raise SystemExit(cli.EXIT_USAGE)


def _write(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
