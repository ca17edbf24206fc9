"""The shards of an ODE-pair build: generated in order, each complete once renamed, resumable.

A shard is written to `*.tmp` and renamed to its final name once complete. Batches never cross
shards and a short last batch is padded by repeating its last example, so a resumed build computes
exactly the batches that an uninterrupted one computes (and matches it bit for bit on the same
machine and software). `plan.json` in the partial directory holds the build's settings; a resume
checks them, discards the incomplete shard and generates the missing shards only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from asd_jax.data import build
from asd_jax.data import prompts as prompts_lib
from asd_jax.data.ode_pairs import layout
from asd_jax.data.ode_pairs import trajectories
from asd_jax.data.ode_pairs.trajectories import OdePairError
from asd_jax.data.ode_pairs.trajectories import OdeTimesteps


def complete_shards(tmp: Path, settings: dict[str, Any]) -> list[int]:
  """The shards of the build in `tmp` that were renamed to their final name."""
  return [i for i in range(settings["num_shards"])
          if layout.shard_paths(tmp, settings, i)[1].is_file()]


def start_or_resume(tmp: Path, settings: dict[str, Any]) -> set[int]:
  """Writes plan.json into a new partial build, or checks it and lists the complete shards."""
  plan_path = tmp / layout.PLAN
  if not plan_path.is_file():  # new, or killed before its plan was written
    for p in tmp.iterdir():
      if p.name != ".lock":
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    build._write_json(plan_path, settings)  # pylint: disable=protected-access
    return set()
  old = json.loads(plan_path.read_text(encoding="utf-8"))
  diff = [f"{key}: not the one used before" if isinstance(settings[key], dict) else
          f"{key}: {old.get(key)!r} then, {settings[key]!r} now" for key in settings
          if old.get(key) != settings[key]]
  if diff:
    raise OdePairError(f"cannot resume {tmp}: its settings differ:\n  " + "\n  ".join(diff) +
                       f"\nRerun with the same settings, or delete {tmp}.")
  done = set()
  for p in tmp.glob("*.tmp"):
    p.unlink()  # the shard being written when the build stopped
  for i in complete_shards(tmp, settings):
    final = layout.shard_paths(tmp, settings, i)[1]
    try:
      ok = layout.num_records(final) == len(layout.shard_range(settings, i))
    except Exception:  # pylint: disable=broad-except
      ok = False
    if ok:
      done.add(i)
    else:
      final.unlink()
  return done


def generate_shards(tmp: Path, done: set[int], settings: dict[str, Any],
                    prompts_ds: prompts_lib.PromptDataset, module: Any, params: Any,
                    plan_t: OdeTimesteps, progress: bool) -> None:
  """Generates every shard not in `done` into `tmp`, in order, each renamed once complete."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  latent_shape = tuple(settings["latent_shape"])
  feats = layout.features(latent_shape, len(plan_t.indices), settings["store_dtype"])
  store = build._store_dtype(settings["store_dtype"])  # pylint: disable=protected-access
  neg_ctx = prompts_ds.negative_context
  neg = np.broadcast_to(neg_ctx[None], (settings["batch_size"],) + neg_ctx.shape)
  initial = sum(len(layout.shard_range(settings, i)) for i in done)
  with tqdm(total=settings["num_examples"], initial=initial, unit="pair", desc="ODE pairs",
            disable=not progress, dynamic_ncols=True) as bar:
    for shard in range(settings["num_shards"]):
      if shard in done:
        continue
      part, final = layout.shard_paths(tmp, settings, shard)
      writer = array_record_module.ArrayRecordWriter(os.fspath(part), "group_size:1")
      try:
        _generate_shard(writer, layout.shard_range(settings, shard), settings, prompts_ds, neg,
                        feats, store, module, params, plan_t, bar)
      except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
      writer.close()
      os.replace(part, final)  # the shard is complete


def _generate_shard(writer: Any, rng: range, settings: dict[str, Any],
                    prompts_ds: prompts_lib.PromptDataset, neg: np.ndarray, feats: Any,
                    store: np.dtype, module: Any, params: Any, plan_t: OdeTimesteps,
                    bar: Any) -> None:
  """Generates examples `rng` in batches of batch_size (the last one padded) into `writer`."""
  bsz, num_prompts = settings["batch_size"], settings["num_prompts"]
  latent_shape = tuple(settings["latent_shape"])
  for start in range(rng.start, rng.stop, bsz):
    idx = np.arange(start, min(start + bsz, rng.stop), dtype=np.int64)
    padded = np.concatenate([idx, np.full((bsz - len(idx),), idx[-1])])  # fixed shapes
    prompt_idx = padded % num_prompts
    batch = prompts_ds.get_batch(prompt_idx)
    noisy, clean = trajectories.generate_pairs(
        module, params, padded, batch["context"], neg, seed=settings["seed"],
        latent_shape=latent_shape, timesteps=plan_t, guidance_scale=settings["guidance_scale"])
    noisy, clean = np.asarray(noisy)[:len(idx)], np.asarray(clean)[:len(idx)]
    finite = np.isfinite(noisy).all(axis=(1, 2, 3, 4, 5)) & np.isfinite(clean).all(
        axis=(1, 2, 3, 4))
    if not finite.all():
      bad_prompts = prompt_idx[:len(idx)][~finite].tolist()
      raise OdePairError(f"the teacher produced non-finite latents for examples "
                         f"{idx[~finite].tolist()} (prompts {bad_prompts}); check the "
                         f"teacher and --dtype.")
    for j, i in enumerate(idx):
      writer.write(feats.serialize_example({
          "index": int(i), "prompt_index": int(prompt_idx[j]), "prompt": batch["prompt"][j],
          "noisy": noisy[j].astype(store), "clean": clean[j].astype(store)}))
    bar.update(len(idx))

