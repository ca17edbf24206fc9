"""The paper's ablation on the toy world, over seeds: `python -m asd_jax.toy.ablation --workdir=DIR`.

One teacher net is pretrained (seed 0; with the analytic teacher it only initialises the critic),
then for every seed the toy pipeline (`asd_jax.toy.pipeline.run`) runs the ODE initialisation and,
from it, the Self Forcing baseline ('dmd'), DMD+ASD at the config's alpha ('asd') and the alpha
sweep ('asd@A'), and evaluates each. Then:

  DIR/report.md        Table 2 (ASD x FFE x 2/1 steps), every schedule, Fig. 4 (x0 similarity
                       across steps), Table 3 (adjacent-step vs teacher distances), Fig. 11 (alpha),
                       Figs. 13-14 (DMD loss variance, discriminator logit gap); mean and spread
  DIR/*.png            the plots
  DIR/videos/*.mp4     a few toy videos (one per class, side by side) of data and generators
  DIR/summary.json     every aggregated number

Finished stages are skipped, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import json
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


def _mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _fmt(values, digits: int = 3) -> str:
  m, s = _mean_std(values)
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def run_all(c, workdir: Path, seeds, alphas, log=print) -> list[dict[str, Any]]:
  """Runs (or finds) every seed's pipeline; returns their results."""
  runs = ["dmd", "asd"] + [f"asd@{a:g}" for a in alphas if float(a) != float(c.asd.alpha)]
  teacher = pipeline.run_stage(pipeline.stage_config(c, "pretrain"), workdir / "teacher", log)
  results = []
  for seed in seeds:
    cs = ml_collections.ConfigDict(c.to_dict())
    cs.seed = int(seed)
    cs.pipeline.teacher_dir = teacher
    cs.pipeline.runs = tuple(runs)
    t0 = time.perf_counter()
    log(f"== seed {seed}")
    results.append(pipeline.run(cs, workdir / f"seed_{seed}", log=lambda s: log(f"  {s}"),
                                show_report=False))
    log(f"== seed {seed}: {time.perf_counter() - t0:.0f} s")
  return results


# ----------------------------------------------------------------------------------------------
# Aggregation.


def summarise(results: list[dict[str, Any]], alpha: float) -> dict[str, Any]:
  """Every aggregated number of the report, as lists over seeds."""
  runs = list(results[0]["runs"])
  per = lambda f: [f(r) for r in results]  # noqa: E731
  s: dict[str, Any] = {"seeds": len(results), "alpha": alpha, "runs": runs}
  s["data"] = {k: per(lambda r, k=k: r["data"][k]) for k in METRICS}
  s["teacher"] = {k: per(lambda r, k=k: r["teacher"][k]) for k in METRICS}
  s["schedules"] = {
      run: {sched: {k: per(lambda r, run=run, sched=sched, k=k: r["runs"][run]["schedules"][sched][k])
                    for k in METRICS}
            for sched in results[0]["runs"][run]["schedules"]}
      for run in runs}
  s["step_similarity"] = {run: {part: np.mean([r["runs"][run]["step_similarity"][part]
                                               for r in results], axis=0).tolist()
                                for part in ("first", "later")} for run in runs}
  s["step_similarity_offdiag"] = {
      run: {part: per(lambda r, run=run, part=part: _offdiag(r["runs"][run]["step_similarity"][part]))
            for part in ("first", "later")} for run in runs}
  s["adjacent"] = {run: {k: per(lambda r, run=run, k=k: r["runs"][run]["adjacent"][k])
                         for k in ("n_to_next", "n_to_teacher")} for run in runs}
  s["training"] = {run: {k: per(lambda r, run=run, k=k: r["runs"][run]["training"][k])
                         for k in ("dmd_loss_mean", "dmd_loss_var", "dmd_loss",
                                   "disc_logit_gap", "step")}
                   for run in runs if run != "ode_init"}
  s["seconds"] = per(lambda r: r.get("seconds", {}).get("total", float("nan")))
  return s


def _offdiag(m) -> float:
  m = np.asarray(m)
  return float(m[~np.eye(len(m), dtype=bool)].mean())


def alpha_of(run: str, default: float) -> float:
  return pipeline.run_alpha(run, default)[1] if run != "ode_init" else float("nan")


def render(s: dict[str, Any]) -> str:
  """report.md of the aggregated numbers (mean ± standard deviation over seeds)."""
  runs, alpha, n = s["runs"], s["alpha"], s["seeds"]
  sch = s["schedules"]
  L = [f"# Toy-world ablation ({n} seeds, mean ± standard deviation over seeds)", ""]
  L += ["## Table 2: ASD x FFE at 2 and 1 steps", "",
        f"ASD: alpha = {alpha:g}; no ASD: the Self Forcing baseline (DMD only), same ODE "
        "initialisation and seed. FFE: the first chunk takes all 4 steps (prefix variant).", ""]
  for metric in ("nll_per_dim", "energy_distance", "temporal_consistency", "precision",
                 "coverage"):
    L += [f"**{NAMES[metric]}**", "", "| ASD | FFE | 2-step | 1-step |", "|---|---|---|---|"]
    for asd in (False, True):
      run = "asd" if asd else "dmd"
      for ffe in (False, True):
        star = "*" if ffe else ""
        L.append(f"| {'✓' if asd else '×'} | {'✓' if ffe else '×'} | "
                 f"{_fmt(sch[run]['2' + star][metric])} | {_fmt(sch[run]['1' + star][metric])} |")
    L.append("")
  L += ["## Every schedule", "", "| generator @ steps | " + " | ".join(NAMES[k] for k in METRICS)
        + " |", "|---" * (len(METRICS) + 1) + "|"]
  L.append("| true data (floor) | " + " | ".join(_fmt(s["data"][k]) for k in METRICS) + " |")
  L.append("| teacher | " + " | ".join(_fmt(s["teacher"][k]) for k in METRICS) + " |")
  for run in runs:
    for name, m in sch[run].items():
      L.append(f"| {run} @ {name} | " + " | ".join(_fmt(m[k]) for k in METRICS) + " |")
  L += ["", "## Fig. 4: cosine similarity of predicted x0 across the 4 steps", "",
        "Mean off-diagonal similarity (1 = every step predicts the same x0); matrices in "
        "`step_similarity.png`.", "", "| generator | first chunk | later chunks |", "|---|---|---|"]
  for run in runs:
    o = s["step_similarity_offdiag"][run]
    L.append(f"| {run} | {_fmt(o['first'])} | {_fmt(o['later'])} |")
  L += ["", "## Table 3: energy distance between step-n samples and step n+1 / the teacher", "",
        "| generator | comparison | step 1 | step 2 | step 3 | step 4 |", "|---|---|---|---|---|---|"]
  for run in runs:
    a = s["adjacent"][run]
    nxt = np.asarray(a["n_to_next"])
    tea = np.asarray(a["n_to_teacher"])
    L.append(f"| {run} | n -> n+1 | " + " | ".join(_fmt(nxt[:, i]) for i in range(nxt.shape[1]))
             + " | n/a |")
    L.append(f"| {run} | n -> teacher | " + " | ".join(_fmt(tea[:, i])
                                                        for i in range(tea.shape[1])) + " |")
  L += ["", "## Fig. 11: alpha sweep", "", "`alpha_sweep.png`; alpha 0 is the baseline.", "",
        "| alpha | NLL/dim @ 4 | @ 2* | @ 1* | energy @ 4 | @ 2* | @ 1* | consistency @ 1* |",
        "|---|---|---|---|---|---|---|---|"]
  for run in sorted((r for r in runs if r != "ode_init"), key=lambda r: alpha_of(r, alpha)):
    m = sch[run]
    L.append(f"| {alpha_of(run, alpha):g} | " + " | ".join(
        _fmt(m[k]["nll_per_dim"]) for k in ("4", "2*", "1*")) + " | " + " | ".join(
        _fmt(m[k]["energy_distance"]) for k in ("4", "2*", "1*")) + " | "
        + _fmt(m["1*"]["temporal_consistency"]) + " |")
  L += ["", "## Figs. 13-14: DMD loss and discriminator logit gap during training", "",
        "`training.png`. DMD loss statistics over the last 80% of each run's generator updates.",
        "", "| generator | DMD loss mean | DMD loss variance | mean logit gap f(n+1) - f(n) |",
        "|---|---|---|---|"]
  for run in s["training"]:
    t = s["training"][run]
    gaps = [np.nanmean(g) if np.any(np.isfinite(g)) else float("nan")
            for g in t["disc_logit_gap"]]
    L.append(f"| {run} | {_fmt(t['dmd_loss_mean'], 4)} | {_fmt(t['dmd_loss_var'], 6)} | "
             + (_fmt(gaps) if np.all(np.isfinite(gaps)) else "n/a (no discriminator)") + " |")
  secs = np.asarray(s["seconds"], np.float64)
  L += ["", f"Wall time per seed (this machine): {np.nanmean(secs):.0f} s on average.", ""]
  return "\n".join(L)


# ----------------------------------------------------------------------------------------------
# Plots and videos.


def plots(s: dict[str, Any], out: Path) -> list[Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  # Fig. 4
  shown = [r for r in ("dmd", "asd") if r in s["step_similarity"]]
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
  # Fig. 11
  runs = sorted((r for r in s["schedules"] if r != "ode_init"), key=lambda r: alpha_of(r, s["alpha"]))
  alphas = [alpha_of(r, s["alpha"]) for r in runs]
  x = np.arange(len(alphas))
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, metric in zip(axes, ("nll_per_dim", "energy_distance")):
    for sched in ("4", "2*", "1*"):
      vals = [_mean_std(s["schedules"][r][sched][metric]) for r in runs]
      ax.errorbar(x, [v[0] for v in vals], yerr=[v[1] for v in vals], marker="o", capsize=3,
                  label=f"{sched} steps")
    ax.set_xticks(x, [f"{a:g}" for a in alphas])
    ax.set_xlabel("alpha")
    ax.set_ylabel(NAMES[metric] + " (lower is better)")
    ax.legend()
  fig.tight_layout()
  written.append(_save(fig, out / "alpha_sweep.png"))
  # Figs. 13-14
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for run in [r for r in ("dmd", "asd") if r in s["training"]]:
    t = s["training"][run]
    loss = np.mean(np.asarray(t["dmd_loss"], np.float64), axis=0)
    axes[0].plot(t["step"][0], loss, label=f"{run} (mean of seeds)", lw=0.8)
  axes[0].set_xlabel("generator update")
  axes[0].set_ylabel("DMD loss")
  axes[0].legend()
  if "asd" in s["training"]:
    t = s["training"]["asd"]
    for i, gap in enumerate(t["disc_logit_gap"]):
      axes[1].plot(t["step"][i], gap, lw=0.6, label=f"seed {i}")
    axes[1].axhline(0.0, color="k", lw=0.5)
    axes[1].set_xlabel("generator update")
    axes[1].set_ylabel("logit gap f(x_{n+1}) - f(x_n)")
    axes[1].legend()
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


def videos(c, workdir: Path, out: Path, seed: int) -> list[Path]:
  """mp4s of one sample per class: the data, and 'dmd' / 'asd' at 4, 2* and 1* steps."""
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
  for run in ("dmd", "asd"):
    export = workdir / f"seed_{seed}" / run / pipeline.EXPORT
    if not export.exists():
      continue
    module, params = pretrained.load(export)
    for sched in ("4", "2*", "1*"):
      x = ev.sample_generator(module, params, world, *table[sched], samples=1, seed=seed)
      write(f"{run}_{sched.replace('*', 'star')}", x)
  return written


# ----------------------------------------------------------------------------------------------
# CLI.

_WORKDIR = flags.DEFINE_string("workdir", None, "ablation directory (an interrupted one continues)")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds of the pipelines")
_ALPHAS = flags.DEFINE_list("alphas", ["0.01", "0.1", "1"],
                            "ASD weights of the alpha sweep (besides 0 = the baseline and the "
                            "config's asd.alpha)")
_CONFIG_ARG = flags.DEFINE_string("config_arg", "ablation", "argument of the toy config "
                                  "(asd_jax/toy/config.py): 'ablation' (the analytic teacher and the "
                                  "ablation's budgets), 'analytic' (the quick start's budgets), "
                                  "'' (the trained teacher), 'quick'")


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  c = get_config(_CONFIG_ARG.value or None)
  c.progress = False
  alphas = [float(a) for a in _ALPHAS.value]
  if any(a <= 0 for a in alphas):
    raise app.UsageError("--alphas must be positive (alpha 0 is the 'dmd' baseline, always run).")
  t0 = time.perf_counter()
  results = run_all(c, workdir, [int(s) for s in _SEEDS.value], alphas)
  s = summarise(results, float(c.asd.alpha))
  (workdir / "summary.json").write_text(json.dumps(s, indent=1))
  report = render(s)
  (workdir / "report.md").write_text(report)
  plots(s, workdir)
  videos(c, workdir, workdir / "videos", int(_SEEDS.value[0]))
  print(report)
  print(f"ablation: {time.perf_counter() - t0:.0f} s; {workdir / 'report.md'}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
