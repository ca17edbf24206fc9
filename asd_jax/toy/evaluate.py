"""Evaluation of toy-world generators with the real sampler, scored against the exact density.

Every generator is sampled with `asd_jax.sampling.generate` (the causal chunk sampler) from the
same noise for every schedule (common random numbers), `samples` videos per class; the teacher with
`asd_jax.diffusion.euler_sample`. Scores are `asd_jax.toy.metrics.class_metrics` per class,
averaged over classes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.diffusion import ffe_schedules, shifted_timesteps
from asd_jax.diffusion.euler import euler_sample
from asd_jax.sampling import generate
from asd_jax.toy import metrics as tm
from asd_jax.toy.world import ToyWorld

Schedule = tuple[str, tuple[float, ...], tuple[float, ...]]


def schedules(training: Sequence[float]) -> list[Schedule]:
  """(name, first-chunk schedule, later-chunk schedule) of every evaluated setting.

  N, 2 and 1 steps for every chunk (prefixes of the training schedule: what random-exit training
  optimises), n* = FFE (the first chunk takes all N steps, later ones n) for n = 2, 1, and the same
  with the "spread" subsets ('/spread') where they differ from the prefix ones.
  """
  ts = tuple(float(t) for t in training)
  out: list[Schedule] = []
  seen = set()
  for variant in ("prefix", "spread"):
    suffix = "" if variant == "prefix" else "/spread"
    for n in sorted({len(ts), min(2, len(ts)), 1}, reverse=True):
      later = ffe_schedules(ts, n, variant)[1]
      rows = [(f"{n}{suffix}", later, later)]
      if n < len(ts):
        rows.append((f"{n}*{suffix}", ts, later))
      for name, first, lat in rows:
        if (first, lat) not in seen:
          seen.add((first, lat))
          out.append((name, first, lat))
  return out


def class_batch(world: ToyWorld, samples: int) -> tuple[np.ndarray, np.ndarray]:
  """(class labels [K * samples], contexts [K * samples, L, D]), classes in blocks."""
  cls = np.repeat(np.arange(world.cfg.num_classes), samples)
  return cls, world.text[cls]


def true_samples(world: ToyWorld, samples: int, seed: int) -> np.ndarray:
  """Fresh samples of the world, [K, samples, F, H, W, C]."""
  cls, _ = class_batch(world, samples)
  x, _ = world.sample(jax.random.key(seed), jnp.asarray(cls))
  return np.asarray(x).reshape((world.cfg.num_classes, samples) + world.cfg.shape)


@functools.lru_cache(maxsize=64)
def _generate_fn(module: Any, first: tuple[float, ...], later: tuple[float, ...],
                 chunk_frames: int, return_steps: bool):
  """One compiled sampler per (architecture, schedules): every generator of a run shares it."""
  return jax.jit(lambda p, c, z, r: generate(module, p, c, z, first_chunk_timesteps=first,
                                             later_chunk_timesteps=later,
                                             chunk_frames=chunk_frames, rng=r,
                                             return_steps=return_steps))


def sample_generator(module: Any, params: Any, world: ToyWorld, first: Sequence[float],
                     later: Sequence[float], *, samples: int, seed: int, chunk_frames: int = 3,
                     return_steps: bool = False):
  """Causal samples [K, samples, ...] (and the per-step x0 of `generate` with return_steps)."""
  cls, ctx = class_batch(world, samples)
  k_noise, k_renoise = jax.random.split(jax.random.key(seed))
  noise = jax.random.normal(k_noise, (len(cls),) + world.cfg.shape)
  # Linen modules hash by their fields: a reloaded model of the same config reuses the compile.
  fn = _generate_fn(module, tuple(float(t) for t in first),
                    tuple(float(t) for t in later), chunk_frames, return_steps)
  out = jax.device_get(fn(params, jnp.asarray(ctx), noise, k_renoise))
  shape = (world.cfg.num_classes, samples) + world.cfg.shape
  if return_steps:
    return np.asarray(out[0]).reshape(shape), np.asarray(out[1]), np.asarray(out[2])
  return np.asarray(out).reshape(shape)


def sample_teacher(module: Any, params: Any, world: ToyWorld, *, samples: int, seed: int,
                   steps: int, shift: float, guidance: float = 1.0) -> np.ndarray:
  """Teacher samples [K, samples, ...]: Euler on the shifted grid of `steps` steps."""
  cls, ctx = class_batch(world, samples)
  k_noise, _ = jax.random.split(jax.random.key(seed))
  noise = jax.random.normal(k_noise, (len(cls),) + world.cfg.shape)
  neg = np.broadcast_to(world.null_text[None], ctx.shape)
  grid = tuple(float(t) for t in shifted_timesteps(steps, shift))
  fn = jax.jit(lambda p, c, n, z: euler_sample(module, p, z, c, n, timesteps=grid,
                                               guidance_scale=guidance))
  x = fn(params, jnp.asarray(ctx), jnp.asarray(neg), noise)
  return np.asarray(x).reshape((world.cfg.num_classes, samples) + world.cfg.shape)


def score(world: ToyWorld, x: np.ndarray, reference: np.ndarray,
          chunk_frames: int = 3) -> dict[str, float]:
  """Class metrics of x [K, N, ...] against true samples [K, N', ...], averaged over classes."""
  return tm.average([tm.class_metrics(world, x[k], k, reference[k], chunk_frames=chunk_frames)
                     for k in range(world.cfg.num_classes)])


def class_energy(a: np.ndarray, b: np.ndarray) -> float:
  """Energy distance between two sample sets [K, N, ...], per class then averaged."""
  return float(np.mean([tm.energy_distance(a[k], b[k]) for k in range(len(a))]))


def evaluate_generator(module: Any, params: Any, world: ToyWorld, training: Sequence[float], *,
                       samples: int, seed: int, reference: np.ndarray,
                       teacher_samples: np.ndarray | None = None,
                       chunk_frames: int = 3) -> dict[str, Any]:
  """Scores at every schedule, the step similarity (Fig. 4) and adjacent-step distances (Table 3).

  Returns {'schedules': {name: metrics}, 'step_similarity': {'first': S x S, 'later': S x S},
  'adjacent': {'n_to_next': [N - 1], 'n_to_teacher': [N]}} (distances: class-averaged energy
  distances between the n-step samples of all chunks and the (n + 1)-step or teacher samples).
  """
  out: dict[str, Any] = {"schedules": {}}
  by_steps = {}
  for name, first, later in schedules(training):
    x = sample_generator(module, params, world, first, later, samples=samples, seed=seed,
                         chunk_frames=chunk_frames)
    out["schedules"][name] = score(world, x, reference, chunk_frames)
    if first == later and name.isdigit():
      by_steps[len(first)] = x
  ts = tuple(float(t) for t in training)
  _, first_steps, later_steps = sample_generator(module, params, world, ts, ts, samples=samples,
                                                 seed=seed, chunk_frames=chunk_frames,
                                                 return_steps=True)
  out["step_similarity"] = {"first": tm.step_similarity(first_steps).tolist(),
                            "later": tm.step_similarity(later_steps).tolist()}
  n_max = len(ts)
  for n in range(1, n_max + 1):  # Table 3 needs every step count (prefix schedules)
    if n not in by_steps:
      by_steps[n] = sample_generator(module, params, world, ts[:n], ts[:n], samples=samples,
                                     seed=seed, chunk_frames=chunk_frames)
  out["adjacent"] = {"n_to_next": [class_energy(by_steps[n], by_steps[n + 1])
                                   for n in range(1, n_max)]}
  if teacher_samples is not None:
    out["adjacent"]["n_to_teacher"] = [class_energy(by_steps[n], teacher_samples)
                                       for n in range(1, n_max + 1)]
  return out


def training_curves(run_dir: str | Path, skip: float = 0.2) -> dict[str, Any]:
  """DMD loss, discriminator logit gap and held-out AUC of a run's metrics.jsonl (Figs. 13-14).

  Mean and variance of the DMD loss are taken after the first `skip` of the run (the transient of
  a generator that starts from the ODE initialisation).
  """
  from asd_jax.train.metrics import JSONL_NAME, read_jsonl  # pylint: disable=g-import-not-at-top
  records = read_jsonl(Path(run_dir) / JSONL_NAME)
  steps = [r["step"] for r in records]
  dmd = [r.get("generator/dmd_loss", float("nan")) for r in records]
  gap = [r.get("disc_logit_gap", float("nan")) for r in records]
  # The discriminator's held-out AUC per n, at the steps it was evaluated (train.disc_auc).
  auc: dict[str, Any] = {}
  for r in records:
    for k, v in r.items():
      if k.startswith("disc_auc/n"):
        a = auc.setdefault(k[len("disc_auc/n"):], {"step": [], "auc": []})
        a["step"].append(r["step"])
        a["auc"].append(v)
  tail = np.asarray(dmd[int(len(dmd) * skip):], np.float64)
  return {"step": steps, "dmd_loss": dmd, "disc_logit_gap": gap, "disc_auc": auc,
          "dmd_loss_mean": float(np.nanmean(tail)) if tail.size else float("nan"),
          "dmd_loss_var": float(np.nanvar(tail)) if tail.size else float("nan")}
