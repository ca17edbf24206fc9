"""Step similarity (the paper's Figs. 4 and 9) and adjacent-step distances (Table 3).

Similarity: for every prompt and sample, `generate(..., return_steps=True)` gives the x0 predicted
at each denoising step; the cosine similarity between steps i and j is taken over a chunk's whole
latent (frames, height, width, channels), for the first chunk and for each later chunk, then
averaged over videos (and, for "later_chunks", over the later chunks).

Distances: the Frechet distance between the output distributions of n-step and (n+1)-step
generation (the same noise for both) and between each and a teacher's many-step outputs, on the
features of a video model given as `--features=module:function` (uint8 videos [N, T, H, W, 3] ->
features [N, D], e.g. an I3D for FVD); with none, on spatially pooled latents [N, F * C], which is
labelled as such and is not FVD.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import sample
from asd_jax.evaluate import videos as vid
from asd_jax.sampling import generate

LATENT_FEATURE = "latent Frechet distance (latents averaged over height and width, [F * C]); not FVD"


def cosine_matrix(steps_SD: np.ndarray) -> np.ndarray:
  """Cosine similarity [S, S] between the rows of [S, D] (float64)."""
  x = np.asarray(steps_SD, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
  return x @ x.T


def chunk_similarities(first: np.ndarray, later: np.ndarray, chunk_frames: int) -> np.ndarray:
  """One video's per-chunk step similarities [n_chunks, S, S] from `generate(return_steps=True)`'s
  first [S, 1, k, h, w, C] and later [S, 1, F - k, h, w, C] (S1 = S2 = S)."""
  S = first.shape[0]
  mats = [cosine_matrix(first.reshape(S, -1))]
  n_later = later.shape[2] // chunk_frames
  lat = later.reshape((later.shape[0], n_later, -1))
  mats += [cosine_matrix(lat[:, c]) for c in range(n_later)]
  return np.stack(mats)


def _prompts(args) -> list[str]:
  return vid.load_prompts(args.prompts)[0]


def _items(prompts: Sequence[str], samples: int) -> list[tuple[int, int]]:
  return [(p, s) for p in range(len(prompts)) for s in range(samples)]


def _batches(items, batch):
  for start in range(0, len(items), batch):
    chunk = items[start:start + batch]
    yield chunk, chunk + [chunk[-1]] * (batch - len(chunk))


def step_similarity(args: argparse.Namespace) -> dict[str, Any]:
  """`similarity`: mean step-similarity matrices, written as JSON and a plot under --out."""
  prompts = _prompts(args)
  (setting,) = vid.parse_settings(args.setting, args.training_steps)
  req = vid.setting_request(args, setting)
  if len(req.first) != len(req.later):
    raise ValueError(f"--setting {setting.name} gives the first chunk {len(req.first)} steps and "
                     f"the later ones {len(req.later)}; the matrices need the same count (e.g. 4).")
  if args.samples < 1 or args.batch < 1:
    raise ValueError("--samples and --batch must be >= 1.")
  out = Path(args.out)
  models = sample.load_models(sample.resolve_parts(args), args.dtype)
  dit = models.dit
  fn = jax.jit(jax.vmap(lambda p, c, z, r: generate(
      dit, p, c, z, first_chunk_timesteps=req.first, later_chunk_timesteps=req.later,
      chunk_frames=sample.CHUNK_FRAMES, rng=r, cache_frames=args.cache_frames,
      sink_frames=args.sink_frames, return_steps=True), in_axes=(None, 0, 0, 0)))
  shape = (1, req.latent_frames) + req.latent_hw + (dit.config.in_channels,)
  per_video = []
  for batch, padded in _batches(_items(prompts, args.samples), args.batch):
    ctx, noise, keys = vid.encode_batch(models, [prompts[p] for p, _ in padded], args.seed,
                                        padded, shape)
    _, first, later = fn(models.dit_params, ctx, noise, keys)
    first, later = np.asarray(first), np.asarray(later)
    per_video += [chunk_similarities(first[i], later[i], sample.CHUNK_FRAMES)
                  for i in range(len(batch))]
  mats = np.stack(per_video)  # [videos, chunks, S, S]
  result = {
      "setting": setting.name, "first_chunk_timesteps": list(req.first),
      "later_chunk_timesteps": list(req.later), "videos": int(mats.shape[0]),
      "prompts": len(prompts), "samples": args.samples, "seed": args.seed,
      "first_chunk": mats[:, 0].mean(0).tolist(),
      "later_chunks": mats[:, 1:].mean((0, 1)).tolist() if mats.shape[1] > 1 else None,
      "per_chunk": mats.mean(0).tolist(),
  }
  vid.atomic_write_bytes(out / "similarity.json", json.dumps(result, indent=1).encode())
  vid.atomic_write_bytes(out / "similarity.png", _plot(result))
  return result


def _plot(result: dict[str, Any]) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [("first chunk", result["first_chunk"])]
  if result["later_chunks"] is not None:
    panels.append(("later chunks", result["later_chunks"]))
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
  for ax, (title, m) in zip(axes[0], panels):
    m = np.asarray(m)
    ax.imshow(m, vmin=min(0.0, m.min()), vmax=1.0, cmap="viridis")
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ticks = range(m.shape[0])
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("denoising step")
    ax.set_title(f"cos(x0_i, x0_j), {title}")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  return buf.getvalue()


def frechet_distance(a_ND: np.ndarray, b_ND: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of Gaussian fits to the rows."""
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a_ND, np.float64), np.asarray(b_ND, np.float64)
  if a.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
    raise ValueError(f"need two [N >= 2, D] feature sets, got {a.shape} and {b.shape}.")
  mu = a.mean(0) - b.mean(0)
  ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
  covmean = linalg.sqrtm(ca @ cb)
  covmean = np.real(covmean)
  return float(max(mu @ mu + np.trace(ca) + np.trace(cb) - 2.0 * np.trace(covmean), 0.0))


def load_features(spec: str | None) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
  """`module:function` -> (function, label), or (None, the latent label) without one."""
  if not spec:
    return None, LATENT_FEATURE
  if ":" not in spec:
    raise ValueError(f"--features must be module:function, got {spec!r}.")
  mod, name = spec.split(":", 1)
  try:
    fn = getattr(importlib.import_module(mod), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"--features {spec!r} cannot be loaded: {e}.") from e
  return fn, f"Frechet distance on {spec} features"


def latent_features(latents_NFhwC: np.ndarray) -> np.ndarray:
  return np.asarray(latents_NFhwC, np.float64).mean((2, 3)).reshape(len(latents_NFhwC), -1)


def adjacent_distances(args: argparse.Namespace) -> dict[str, Any]:
  """`distances`: Frechet distances n -> n+1 and n -> teacher for n = 1..training_steps."""
  from asd_jax import pretrained  # pylint: disable=g-import-not-at-top
  from asd_jax.data.prompts import WAN_NEGATIVE_PROMPT  # pylint: disable=g-import-not-at-top
  from asd_jax.diffusion import shifted_timesteps  # pylint: disable=g-import-not-at-top
  from asd_jax.diffusion.euler import euler_sample  # pylint: disable=g-import-not-at-top
  prompts = _prompts(args)
  features, label = load_features(args.features)
  if args.samples < 1 or args.batch < 1:
    raise ValueError("--samples and --batch must be >= 1.")
  if len(prompts) * args.samples < 2:
    raise ValueError("a distribution distance needs at least 2 videos (--samples x prompts).")
  steps = list(range(1, args.training_steps + 1))
  settings = [vid.Setting(str(n), n, False) for n in steps]
  requests = {s.name: vid.setting_request(args, s) for s in settings}
  if args.teacher and not Path(args.teacher).is_dir():
    raise FileNotFoundError(f"--teacher {args.teacher} is not a converted DiT directory.")
  if args.teacher_steps < 1:
    raise ValueError(f"--teacher_steps must be >= 1, got {args.teacher_steps}.")
  out = Path(args.out)
  models = sample.load_models(sample.resolve_parts(args), args.dtype)
  step_fn = vid.decoder(models.vae) if features is not None else None
  items = _items(prompts, args.samples)
  req0 = requests[settings[0].name]
  shape = (1, req0.latent_frames) + req0.latent_hw + (models.dit.config.in_channels,)

  def feats(latents_list):
    lat = np.concatenate(latents_list)  # [N, F, h, w, C]
    if features is None:
      return latent_features(lat)
    vids = np.stack([np.concatenate(list(vid._decode(models, step_fn, jnp.asarray(x[None]))))  # pylint: disable=protected-access
                     for x in lat])
    return np.asarray(features(vids), np.float64)

  outputs = {}
  for s in settings:
    sampler = vid.batched_sampler(models.dit, requests[s.name], args)
    lats = []
    for batch, padded in _batches(items, args.batch):
      ctx, noise, keys = vid.encode_batch(models, [prompts[p] for p, _ in padded], args.seed,
                                          padded, shape)
      lats.append(np.asarray(sampler(models.dit_params, ctx, noise, keys))[:len(batch), 0])
    outputs[s.name] = feats(lats)
  result = {"feature": label, "videos": len(items), "steps": steps,
            "n_to_n_plus_1": {str(n): frechet_distance(outputs[str(n)], outputs[str(n + 1)])
                              for n in steps[:-1]}}
  if args.teacher:
    teacher, teacher_params = pretrained.load(args.teacher, dtype=args.dtype)
    grid = shifted_timesteps(args.teacher_steps, args.teacher_shift)
    neg, _ = models.encoder([WAN_NEGATIVE_PROMPT])
    run = jax.jit(lambda p, z, c, nc: euler_sample(teacher, p, z, c, nc, timesteps=grid,
                                                   guidance_scale=args.teacher_guidance))
    lats = []
    for batch, padded in _batches(items, args.batch):
      ctx, noise, _ = vid.encode_batch(models, [prompts[p] for p, _ in padded], args.seed,
                                       padded, shape)
      nc = jnp.broadcast_to(jnp.asarray(neg), (len(padded),) + neg.shape[1:])
      lats.append(np.asarray(run(teacher_params, noise[:, 0], ctx[:, 0], nc))[:len(batch)])
    teacher_feats = feats(lats)
    result["teacher"] = {"dir": str(Path(args.teacher).resolve()), "steps": args.teacher_steps,
                         "guidance": args.teacher_guidance, "shift": args.teacher_shift}
    result["n_to_teacher"] = {str(n): frechet_distance(outputs[str(n)], teacher_feats)
                              for n in steps}
  vid.atomic_write_bytes(out / "distances.json", json.dumps(result, indent=1).encode())
  return result
