"""VBench videos: every (setting, prompt, sample) as the mp4 VBench's evaluation looks for.

Layout under `--out`: one folder a setting (`4`, `2_ffe` for 2*, `1_ffe` for 1*) holding only the
videos, `{prompt}-{index}.mp4` (what `vbench.VBench.build_full_info_json` looks up in its standard
mode, indices 0..4; VBench takes the suffix of the first file of the folder, so nothing else may
live there), `manifest.json` beside the folders and, with `--save_latents`, the latents under
`latents/{setting}/`.

The video of (prompt index p, sample index s) starts from the key `video_key(seed, p, s)` for
every setting (the settings are paired: same noise), so any subset regenerates exactly. Prompts are
split across processes by index (p % num_shards == shard), so no two write the same file; every
file is written to a temporary name and renamed, so a file that exists is complete and a rerun
skips it (a killed run resumes where it stopped).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import sample

VBENCH_INFO = "VBench_full_info.json"
MANIFEST = "manifest.json"
LATENTS_DIR = "latents"
VBENCH_SAMPLES = 5  # VBench's standard mode looks for indices 0..4 of every prompt.
NAME_MAX_BYTES = 255


@dataclass(frozen=True)
class Setting:
  """An inference setting: `steps` per later chunk; with `ffe` the first chunk takes every step of
  the training schedule (the paper's n*)."""
  name: str
  steps: int
  ffe: bool

  @property
  def folder(self) -> str:
    return self.name.replace("*", "_ffe")


@dataclass(frozen=True)
class Item:
  """One video to write."""
  prompt_index: int
  sample_index: int
  prompt: str
  path: Path


def parse_settings(text: str, training_steps: int) -> list[Setting]:
  """'4,2*,1*' -> settings; n is n steps on every chunk, n* is FFE (all training steps first)."""
  out = []
  for raw in (t.strip() for t in text.split(",")):
    if not raw:
      continue
    ffe = raw.endswith("*")
    try:
      steps = int(raw[:-1] if ffe else raw)
    except ValueError:
      steps = 0
    if not 1 <= steps <= training_steps:
      raise ValueError(f"--settings entry {raw!r} is not n or n* with n in [1, {training_steps}] "
                       f"(--training_steps); e.g. --settings=4,2*,1*.")
    out.append(Setting(raw, steps, ffe))
  if not out:
    raise ValueError("--settings is empty; e.g. --settings=4,2*,1*.")
  names = [s.folder for s in out]
  if len(set(names)) != len(names):
    raise ValueError(f"--settings repeats a setting: {text!r}.")
  return out


def setting_request(args: argparse.Namespace, setting: Setting) -> sample.Request:
  """The schedules and sizes of a setting, worked out and checked by `asd_jax.sample.plan` (the
  sampling CLI's own validation: what `python -m asd_jax.sample --steps=n [--first_chunk_steps]`
  would run)."""
  first_steps = args.training_steps if setting.ffe else setting.steps
  ns = argparse.Namespace(**{**vars(args), "prompt": "-", "prompts_file": None,
                             "output": "video.mp4", "steps": setting.steps,
                             "first_chunk_steps": first_steps, "first_chunk_timesteps": None,
                             "later_chunk_timesteps": None})
  return sample.plan(ns)


def vbench_info_path() -> Path:
  """VBench_full_info.json of the installed `vbench` package (found without importing it)."""
  spec = importlib.util.find_spec("vbench")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the vbench package is not installed, so its standard prompt suite (VBench_full_info.json) "
        "is not here: `pip install vbench --no-deps` (the prompts only), or give --prompts=FILE.")
  path = Path(list(spec.submodule_search_locations)[0]) / VBENCH_INFO
  if not path.is_file():
    raise FileNotFoundError(f"the installed vbench package has no {VBENCH_INFO} at {path}; "
                            f"reinstall it or give --prompts=FILE.")
  return path


def load_prompts(prompts_file: str | None) -> tuple[list[str], str]:
  """(prompts, source): VBench's standard suite (each distinct `prompt_en` once, in its order) or
  a text file, one prompt a line."""
  if prompts_file:
    path = Path(prompts_file)
    if not path.is_file():
      raise FileNotFoundError(f"--prompts {path} does not exist.")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    source = str(path.resolve())
  else:
    path = vbench_info_path()
    prompts = [entry["prompt_en"] for entry in json.loads(path.read_text(encoding="utf-8"))]
    source = f"vbench:{VBENCH_INFO}"
  prompts = list(dict.fromkeys(prompts))  # VBench names videos by prompt: a repeat is one video
  if not prompts:
    raise ValueError(f"no prompts in {source}.")
  for p in prompts:
    video_name(p, VBENCH_SAMPLES - 1)
  return prompts, source


def video_name(prompt: str, index: int) -> str:
  """`{prompt}-{index}.mp4`, the name VBench's standard mode looks for."""
  name = f"{prompt}-{index}.mp4"
  if "/" in prompt or "\0" in prompt:
    raise ValueError(f"prompt {prompt!r} contains '/', which cannot be part of a file name.")
  if len(name.encode("utf-8")) > NAME_MAX_BYTES:
    raise ValueError(f"prompt {prompt[:60]!r}... gives a file name over {NAME_MAX_BYTES} bytes; "
                     f"shorten it.")
  return name


def video_key(seed: int, prompt_index: int, sample_index: int) -> jax.Array:
  """The key of one video: a pure function of (seed, prompt index, sample index)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), prompt_index), sample_index)


def shard_of(args: argparse.Namespace) -> tuple[int, int]:
  """(shard, num_shards): the flags, else this process among jax's processes."""
  num = args.num_shards if args.num_shards is not None else jax.process_count()
  shard = args.shard if args.shard is not None else jax.process_index()
  if num < 1 or not 0 <= shard < num:
    raise ValueError(f"--shard must be in [0, --num_shards), got shard {shard} of {num}.")
  return shard, num


def work_items(prompts: Sequence[str], samples: int, folder: Path, shard: int,
               num_shards: int) -> list[Item]:
  """This shard's videos of one setting: prompts with index % num_shards == shard."""
  return [Item(p, s, prompts[p], folder / video_name(prompts[p], s))
          for p in range(shard, len(prompts), num_shards) for s in range(samples)]


def atomic_write_bytes(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"python": sys.version.split()[0]}
  for pkg in ("asd_jax", "jax", "jaxlib", "flax", "vbench"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  return out


def run_identity(args: argparse.Namespace, settings: Sequence[Setting],
                 requests: dict[str, sample.Request], prompts: Sequence[str], source: str,
                 parts: dict[str, Path]) -> dict[str, Any]:
  """What makes two runs' videos interchangeable (a resumed run must match it)."""
  from asd_jax import pretrained  # pylint: disable=g-import-not-at-top
  return {
      "settings": {s.name: {"folder": s.folder, "first_chunk_timesteps": list(requests[s.name].first),
                            "later_chunk_timesteps": list(requests[s.name].later)}
                   for s in settings},
      "seed": args.seed, "samples": args.samples, "num_frames": args.num_frames,
      "height": args.height, "width": args.width, "dtype": args.dtype,
      "cache_frames": args.cache_frames, "sink_frames": args.sink_frames,
      "prompts": {"source": source, "count": len(prompts),
                  "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()},
      "model": {**{k: str(v.resolve()) for k, v in sorted(parts.items())},
                "dit_config": pretrained.read_config(parts["dit"])["config"]},
      "seed_rule": "video_key(seed, prompt_index, sample_index), the same for every setting",
  }


def check_manifest(out: Path, identity: dict[str, Any]) -> None:
  path = out / MANIFEST
  if not path.is_file():
    return
  old = json.loads(path.read_text(encoding="utf-8")).get("run", {})
  differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
  if differ:
    raise ValueError(f"{out} holds videos of another run ({', '.join(differ)} differ in "
                     f"{path}); give another --out or the same flags.")


def batched_sampler(dit: Any, req: sample.Request, args: argparse.Namespace):
  """`sample.make_sampler` (batch 1) mapped over a batch of videos, each with its own noise and
  re-noising key: `f(params, context [B, 1, L, D], noise [B, 1, F, h, w, C], keys [B])`. One
  compile per setting and batch size, whatever the number of chunks; cached per (model, schedules,
  cache), so a resumed or repeated run in the same process compiles nothing new."""
  return _batched_sampler(dit, tuple(req.first), tuple(req.later), args.cache_frames,
                          args.sink_frames)


@functools.lru_cache(maxsize=16)
def _batched_sampler(dit, first, later, cache_frames, sink_frames):
  req = sample.Request([], first, later, 0, (0, 0), [])
  one = sample.make_sampler(dit, req, cache_frames=cache_frames, sink_frames=sink_frames)
  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


@functools.lru_cache(maxsize=4)
def decoder(vae: Any):
  """`sample.make_decoder`, one per VAE module (its compiled programs reused by every video)."""
  return sample.make_decoder(vae)


def encode_batch(models: sample.Models, prompts: Sequence[str], seed: int,
                 keys: Sequence[tuple[int, int]], shape: Sequence[int]):
  """(context [B, 1, L, D], noise [B, 1, F, h, w, C], re-noising keys [B]) of a batch."""
  context, _ = models.encoder(list(prompts))
  noise, renoise = zip(*(sample.video_noise(video_key(seed, p, s), shape) for p, s in keys))
  return (jnp.asarray(context)[:, None], jnp.stack(noise), jnp.stack(renoise))


def generate_videos(args: argparse.Namespace) -> dict[str, Any]:
  """Writes this shard's missing videos of every setting; returns a summary (counts, seconds,
  compiles per setting). Everything is checked before a model is loaded."""
  prompts, source = load_prompts(args.prompts)
  settings = parse_settings(args.settings, args.training_steps)
  if args.samples < 1:
    raise ValueError(f"--samples must be >= 1, got {args.samples}.")
  if args.batch < 1:
    raise ValueError(f"--batch must be >= 1, got {args.batch}.")
  requests = {s.name: setting_request(args, s) for s in settings}
  shard, num_shards = shard_of(args)
  parts = sample.resolve_parts(args)
  out = Path(args.out)
  identity = run_identity(args, settings, requests, prompts, source, parts)
  check_manifest(out, identity)
  todo = {s.name: [it for it in work_items(prompts, args.samples, out / s.folder, shard, num_shards)
                   if not it.path.exists()] for s in settings}
  summary = {"shard": shard, "num_shards": num_shards, "written": 0,
             "skipped": sum(len(work_items(prompts, args.samples, out / s.folder, shard,
                                           num_shards)) for s in settings)
             - sum(len(v) for v in todo.values()), "compiles": {}, "seconds": 0.0}
  if shard == 0:
    manifest = {"run": identity, "versions": _versions(), "prompts": prompts,
                "layout": "{setting folder}/{prompt}-{sample index}.mp4"}
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
  total = sum(len(v) for v in todo.values())
  if not total:
    return summary
  models = sample.load_models(parts, args.dtype)
  step = decoder(models.vae)
  bar = None
  if not args.quiet:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, desc=f"videos (shard {shard}/{num_shards})", unit="video",
               file=sys.stderr)
  t0 = time.perf_counter()
  for setting in settings:
    items, req = todo[setting.name], requests[setting.name]
    if not items:
      continue
    shape = (1, req.latent_frames) + req.latent_hw + (models.dit.config.in_channels,)
    pixel_hw = (req.latent_hw[0] * 8, req.latent_hw[1] * 8)
    sampler = batched_sampler(models.dit, req, args)
    for start in range(0, len(items), args.batch):
      batch = items[start:start + args.batch]
      padded = batch + [batch[-1]] * (args.batch - len(batch))  # one compiled batch size
      ctx, noise, keys = encode_batch(models, [it.prompt for it in padded], args.seed,
                                      [(it.prompt_index, it.sample_index) for it in padded], shape)
      latents = jax.block_until_ready(sampler(models.dit_params, ctx, noise, keys))
      for i, item in enumerate(batch):
        if args.save_latents:
          buf = _npy_bytes(np.asarray(latents[i, 0]))
          atomic_write_bytes(out / LATENTS_DIR / setting.folder / (item.path.stem + ".npy"), buf)
        sample.write_mp4(item.path, sample.decode_stream(models.vae, models.vae_params, latents[i],
                                                         step=step), pixel_hw)
        summary["written"] += 1
        if bar is not None:
          bar.update(1)
    summary["compiles"][setting.name] = sampler._cache_size()  # pylint: disable=protected-access
  if bar is not None:
    bar.close()
  summary["seconds"] = round(time.perf_counter() - t0, 3)
  return summary


def _npy_bytes(array: np.ndarray) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def read_manifest(out: Path) -> dict[str, Any]:
  path = Path(out) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: --videos must be an --out of "
                            f"`python -m asd_jax.evaluate vbench`.")
  return json.loads(path.read_text(encoding="utf-8"))


def missing_videos(out: Path, manifest: dict[str, Any]) -> dict[str, list[str]]:
  """Per setting, the expected videos that are not there yet."""
  run = manifest["run"]
  prompts = manifest["prompts"]
  missing = {}
  for name, info in run["settings"].items():
    folder = Path(out) / info["folder"]
    missing[name] = [it.path.name for it in work_items(prompts, run["samples"], folder, 0, 1)
                     if not it.path.exists()]
  return missing
