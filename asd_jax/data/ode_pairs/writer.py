"""Builds an ODE-pair dataset: checks first, then the teacher, the shards, the metadata, the mark.

A build writes into the hidden sibling `.{out}.partial`, which becomes `out` by one rename after
its completeness mark (`ode_pairs.json`) is written, so `out` never holds a partial dataset. On an
exception (Ctrl-C included) the partial directory is removed when no shard was complete, and kept
otherwise (with a note on stderr). A killed process leaves it as it was. Rerunning the same build
with `resume` continues it (see `shards`); without `resume` an existing partial directory is an
error.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asd_jax import pretrained
from asd_jax.data import build
from asd_jax.data import prompts as prompts_lib
from asd_jax.data.ode_pairs import layout
from asd_jax.data.ode_pairs import shards
from asd_jax.data.ode_pairs import trajectories
from asd_jax.data.ode_pairs.layout import DEFAULT_NAME
from asd_jax.data.ode_pairs.layout import FORMAT_VERSION
from asd_jax.data.ode_pairs.layout import MARKER
from asd_jax.data.ode_pairs.layout import PLAN
from asd_jax.data.ode_pairs.layout import SPLIT
from asd_jax.data.ode_pairs.layout import STORE_DTYPES
from asd_jax.data.ode_pairs.trajectories import DEFAULT_TRAINING_TIMESTEPS
from asd_jax.data.ode_pairs.trajectories import OdePairError
from asd_jax.diffusion import schedule

_SHARD_BYTES = 1 << 30


def _fingerprint(path: Path) -> dict[str, Any]:
  """What identifies a prompt dataset or a teacher, independently of where it lies."""
  return json.loads(path.read_text(encoding="utf-8"))


def partial_dir(out: str | os.PathLike) -> Path:
  """Where the build of `out` is made (and kept, when interrupted, for --resume)."""
  out = Path(out).expanduser().absolute()
  return out.parent / f".{out.name}.partial"


def build_ode_pairs(prompts: str | os.PathLike, teacher: str | os.PathLike,
                    out: str | os.PathLike, *, num_examples: int | None = None, frames: int = 21,
                    height: int = 60, width: int = 104, steps: int = 48, shift: float = 5.0,
                    guidance_scale: float = 6.0,
                    training_timesteps: Sequence[float] = DEFAULT_TRAINING_TIMESTEPS,
                    seed: int = 0, batch_size: int = 1, dtype: str = "bfloat16",
                    param_dtype: str | None = None, store_dtype: str = "bfloat16",
                    examples_per_shard: int | None = None, name: str = DEFAULT_NAME,
                    resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
  """Generates ODE pairs with a teacher and writes them as a dataset at `out`.

  Args:
    prompts: a prompt dataset directory (`python -m asd_jax.data.build`).
    teacher: a converted Wan DiT directory (`python -m asd_jax.convert wan`), bidirectional.
    out: the dataset directory to create (absent or empty, unless `overwrite`).
    num_examples: examples to make (default: one per prompt; more cycle through the prompts).
    frames, height, width: the latent size F, H, W (C is the teacher's in_channels).
    steps, shift: the teacher's Euler grid (`shifted_timesteps(steps, shift)`).
    guidance_scale: CFG weight on the negative prompt.
    training_timesteps: unwarped; warped with `shift` they must be grid points.
    seed: noise seed in [0, 2^31); example i's noise depends on (seed, i) only.
    batch_size: examples per teacher call.
    dtype: the teacher's compute dtype ('bfloat16' or 'float32').
    param_dtype: cast the teacher's params on load (default: as stored).
    store_dtype: 'bfloat16' (default) or 'float32' (exact float32 latents).
    examples_per_shard: default: as many as fit in about 1 GiB.
    name: the TFDS dataset name.
    resume: continue the partial build of `out` left by an interrupted run with the same settings.
    overwrite: replace a non-empty `out` once the new build is complete.
    progress: show a progress bar.
  Returns:
    The dataset directory (absolute).
  Raises:
    FileNotFoundError: no prompt dataset or teacher there.
    OdePairError (a BuildError): bad settings, a partial build without `resume`, a resume with other
      settings, or non-finite teacher output. `out` is left as it was, whatever the error.
  """
  # Everything that can be checked is checked before the teacher loads.
  if not build._NAME_RE.match(name):  # pylint: disable=protected-access
    raise OdePairError(f"name must be lowercase letters, digits and underscores, starting with a "
                       f"letter; got {name!r}.")
  if store_dtype not in STORE_DTYPES:
    raise OdePairError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}.")
  if dtype not in ("bfloat16", "float32") or param_dtype not in (None, "bfloat16", "float32"):
    raise OdePairError(f"dtype and param_dtype must be 'bfloat16' or 'float32', got {dtype!r} "
                       f"and {param_dtype!r}.")
  trajectories.check_sizes(frames, height, width, batch_size)
  seed = trajectories.check_seed(seed)
  plan_t = trajectories.ode_timesteps(steps, shift, training_timesteps)
  prompts_ds = prompts_lib.PromptDataset(prompts)
  teacher_dir = Path(teacher).expanduser()
  if not teacher_dir.is_dir():
    raise FileNotFoundError(f"--teacher {teacher_dir} is not a directory (convert the teacher "
                            f"with `python -m asd_jax.convert wan --src=... --dst=DIR`).")
  meta = pretrained.read_config(teacher_dir)
  if meta["kind"] != "wan":
    raise OdePairError(f"--teacher {teacher_dir} holds a {meta['kind']!r} checkpoint, not a Wan "
                       f"DiT.")
  cfg = meta["config"]
  if cfg["text_dim"] != prompts_ds.d_model:
    raise OdePairError(f"the teacher takes contexts of width {cfg['text_dim']} but the prompt "
                       f"dataset {prompts} holds width {prompts_ds.d_model}; encode the prompts "
                       f"with the teacher's text encoder.")
  _, ph, pw = cfg["patch_size"]
  if height % ph or width % pw:
    raise OdePairError(f"latent height and width must be multiples of the patch size "
                       f"({ph}, {pw}), got {height}x{width}.")
  n = len(prompts_ds) if num_examples is None else num_examples
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not (
      1 <= n <= trajectories.MAX_INT32):
    raise OdePairError(f"num_examples must be an int in [1, 2^31), got {num_examples!r}.")
  latent_shape = (int(frames), int(height), int(width), int(cfg["in_channels"]))
  k = len(plan_t.indices)
  example_bytes = (k + 1) * int(np.prod(latent_shape)) * (2 if store_dtype == "bfloat16" else 4)
  per_shard = examples_per_shard or max(1, _SHARD_BYTES // example_bytes)
  if isinstance(per_shard, bool) or not isinstance(per_shard, (int, np.integer)) or per_shard < 1:
    raise OdePairError(f"examples_per_shard must be an int >= 1, got {examples_per_shard!r}.")
  num_shards = -(-n // per_shard)
  settings = {
      "format_version": FORMAT_VERSION, "name": name, "num_examples": int(n),
      "num_prompts": len(prompts_ds), "examples_per_shard": int(per_shard),
      "num_shards": num_shards, "latent_shape": list(latent_shape), "steps": int(steps),
      "shift": float(shift), "guidance_scale": float(guidance_scale),
      "training_timesteps": [float(t) for t in schedule.validate_timesteps(training_timesteps)],
      "timesteps": list(plan_t.timesteps), "timestep_indices": list(plan_t.indices),
      "seed": seed, "batch_size": int(batch_size), "dtype": dtype, "param_dtype": param_dtype,
      "store_dtype": store_dtype, "negative_prompt": prompts_ds.negative_prompt,
      "prompt_dataset": _fingerprint(prompts_ds.directory / prompts_lib.MARKER),
      "teacher": _fingerprint(teacher_dir / pretrained.CONFIG_FILE),
  }
  out = build.check_out_dir(out, overwrite=overwrite)
  tmp = partial_dir(out)
  if tmp.exists() and not resume:
    raise OdePairError(f"{tmp} holds an interrupted build of {out}; pass --resume to continue it "
                       f"(with the same settings), or delete it.")
  _check_space(out, tmp, n * example_bytes)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp.mkdir(exist_ok=True)
  lock = open(tmp / ".lock", "w")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raise OdePairError(f"another process is building into {tmp}.") from e
    done = shards.start_or_resume(tmp, settings)
    try:
      module, params = pretrained.load(
          teacher_dir, dtype=dtype, **({"param_dtype": param_dtype} if param_dtype else {}))
      shards.generate_shards(tmp, done, settings, prompts_ds, module, params, plan_t, progress)
      _finish(tmp, settings, prompts_ds, teacher_dir)
    except BaseException:
      kept = shards.complete_shards(tmp, settings)
      if kept:
        print(f"note: the build stopped; its {len(kept)} complete shards of {num_shards} are kept "
              f"in {tmp}: rerun with --resume to continue, or delete it.", file=sys.stderr)
      else:
        shutil.rmtree(tmp, ignore_errors=True)
      raise
    (tmp / ".lock").unlink()
    build._move_into_place(tmp, out)  # pylint: disable=protected-access
  finally:
    lock.close()
  return out


def _finish(tmp: Path, settings: dict[str, Any], prompts_ds: prompts_lib.PromptDataset,
            teacher_dir: Path) -> None:
  """TFDS metadata, a read-back check, then the completeness mark."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  files = [layout.shard_paths(tmp, settings, i)[1] for i in range(settings["num_shards"])]
  num_bytes = sum(p.stat().st_size for p in files)
  split = tfds.core.SplitInfo(
      name=SPLIT, shard_lengths=[len(layout.shard_range(settings, i)) for i in range(len(files))],
      num_bytes=num_bytes, filename_template=layout.shard_template(tmp, settings["name"]))
  feats = layout.features(settings["latent_shape"], len(settings["timesteps"]),
                          settings["store_dtype"])
  tfds.folder_dataset.write_metadata(
      data_dir=tmp, features=feats, split_infos=[split],
      filename_template=build._FILENAME_TEMPLATE,  # pylint: disable=protected-access
      version="1.0.0", check_data=False, disable_shuffling=True,
      description=(f"Teacher ODE trajectories for Wan 2.1 ODE initialisation: x at timesteps "
                   f"{settings['timesteps']} and x0; read with "
                   f"asd_jax.data.ode_pairs.OdePairDataset (see {MARKER})."))
  source = tfds.builder_from_directory(os.fspath(tmp)).as_data_source()[SPLIT]
  last = settings["num_examples"] - 1
  if len(source) != settings["num_examples"] or int(source[last]["index"]) != last:
    raise RuntimeError(f"the dataset written to {tmp} does not read back as written.")
  info = {**settings, "num_bytes": num_bytes, "prompts_dir": str(prompts_ds.directory.absolute()),
          "teacher_dir": str(teacher_dir.absolute()),
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  build._write_json(tmp / MARKER, info)  # pylint: disable=protected-access
  (tmp / PLAN).unlink()  # after the mark: a failure in between keeps the build resumable


def _check_space(out: Path, tmp: Path, need: int) -> None:
  """Refuses a build the disk at `out` cannot hold (the shards a resumed build has are counted)."""
  from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
  done = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
  try:
    atomic.check_free_space(out, max(0, need - done), "the ODE-pair dataset", "--out")
  except atomic.DestinationError as e:
    raise OdePairError(str(e)) from None
