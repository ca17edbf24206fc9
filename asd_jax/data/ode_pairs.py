"""ODE-initialisation pairs: teacher trajectories kept at the training timesteps (ALGORITHM.md 9).

    python -m asd_jax.data.ode_pairs --prompts=data/prompts --teacher=ckpt/dit --out=data/ode \
        [--num_examples=N] [--frames=21 --height=60 --width=104] [--steps=48] [--shift=5] \
        [--guidance=6] [--training_timesteps=1000,750,500,250] [--seed=0] [--batch_size=1] \
        [--dtype=bfloat16] [--store_dtype=bfloat16] [--resume]

Example i takes prompt i mod P of the prompt dataset (P prompts; `--num_examples` defaults to P, and
a larger value cycles through the prompts with fresh noise) and the noise
`normal(fold_in(key(seed), i))` of shape [F, H, W, C] (latent frames, height, width, channels), a
function of (seed, i) only. The teacher integrates the probability-flow ODE from that noise with
`euler_sample` on the shifted grid of `--steps` steps, with classifier-free guidance against the
dataset's negative prompt. The warped training timesteps (`--training_timesteps` passed through the
shift: [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625]) must be points of that grid (48 steps
with shift 5 gives exactly these four); x at them is stored as `noisy` [K, F, H, W, C], the ODE's
end at t = 0 as `clean` [F, H, W, C].

Layout (a TFDS ArrayRecord dataset, read without TensorFlow):

    DIR/dataset_info.json, features.json               TFDS metadata
    DIR/{name}-train.array_record-0000i-of-0000n        `examples_per_shard` examples per shard
    DIR/ode_pairs.json                                   build facts (timesteps included), last

Each example holds `index` (int64, its position), `prompt_index` (int64, its row in the prompt
dataset), `prompt` (text, to check joins) and `noisy`, `clean` as raw bfloat16 (or float32) bytes.
Contexts are not stored: `OdePairDataset(DIR).with_context(PromptDataset(PROMPTS))` joins them.

Builds, interruptions and `--resume`. A build writes into the hidden sibling `.{out}.partial`, which
becomes `out` by one rename after its completeness mark (`ode_pairs.json`) is written, so `out`
never holds a partial dataset. Shards are generated in order; a shard is complete once renamed from
`*.tmp` to its final name. On an exception (Ctrl-C included) the partial directory is removed when
no shard was complete, and kept otherwise (with a note on stderr). A killed process leaves it as it
was. Rerunning the same command with `--resume` checks that the settings match (`plan.json` in the
partial directory), discards the incomplete shard and generates the missing shards only. Batches
never cross shards and a short last batch is padded by repeating its last example, so a resumed
build computes exactly the batches that an uninterrupted one computes (and matches it bit for bit
on the same machine and software). Without `--resume` an existing partial directory is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from asd_jax import pretrained
from asd_jax.data import build
from asd_jax.data import prompts as prompts_lib
from asd_jax.diffusion import schedule
from asd_jax.diffusion.euler import euler_sample

MARKER = "ode_pairs.json"  # written last; its absence means "incomplete"
PLAN = "plan.json"  # settings of a partial build, checked on resume
FORMAT_VERSION = 1
SPLIT = "train"
DEFAULT_NAME = "ode_pairs"
DEFAULT_TRAINING_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)
STORE_DTYPES = ("bfloat16", "float32")
_GRID_ATOL = 1e-6  # timestep units; grid and warped values differ only by float64 rounding
_MAX_INT32 = 2**31 - 1
_SHARD_BYTES = 1 << 30


class OdePairError(build.BuildError):
  """Bad settings or inputs for an ODE-pair build."""


# ----------------------------------------------------------------------------------------------
# Timesteps and noise


@dataclasses.dataclass(frozen=True)
class OdeTimesteps:
  """The sampler's grid and where the training timesteps lie on it.

  Attributes:
    grid: steps + 1 timesteps from 1000 down to 0 (float64 values, as `shifted_timesteps`).
    timesteps: the K training timesteps, as the grid values x is kept at.
    indices: their positions in `grid` (x at timesteps[k] is the trajectory's entry indices[k]).
  """
  grid: tuple[float, ...]
  timesteps: tuple[float, ...]
  indices: tuple[int, ...]


def ode_timesteps(steps: int = 48, shift: float = 5.0,
                  training_timesteps: Sequence[float] = DEFAULT_TRAINING_TIMESTEPS) -> OdeTimesteps:
  """Places the warped training timesteps on the shifted Euler grid of `steps` steps.

  Args:
    steps: Euler steps of the teacher (the grid has steps + 1 points, 1000 to 0).
    shift: the timestep shift of the grid, also applied to `training_timesteps`.
    training_timesteps: unwarped, strictly decreasing, in (0, 1000] ([1000, 750, 500, 250]).
  Raises:
    OdePairError: a warped training timestep is not a grid point (the message lists the grid and
      step counts that would work), or bad arguments.
  """
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise OdePairError(f"steps must be an int >= 1, got {steps!r}.")
  if not np.isfinite(shift) or shift <= 0:
    raise OdePairError(f"shift must be a positive number, got {shift!r}.")
  try:
    unwarped = schedule.validate_timesteps(training_timesteps, "training timesteps")
  except ValueError as e:
    raise OdePairError(str(e)) from e
  grid = schedule.shifted_timesteps(int(steps), shift)
  warped = schedule.warp_timesteps(unwarped, shift)
  indices, off = [], []
  for t in warped:
    hits = np.nonzero(np.isclose(grid, t, rtol=0.0, atol=_GRID_ATOL))[0]
    if hits.size:
      indices.append(int(hits[0]))
    else:
      off.append(t)
  if off:
    # t lies on the grid iff (t / 1000) * steps is an integer, so the good counts are the
    # multiples of the smallest one.
    good = next((n for n in range(1, 10001)
                 if all(abs(u / 1000 * n - round(u / 1000 * n)) < 1e-9 for u in unwarped)), None)
    hint = (f"use a multiple of {good} steps" if good else
            "no step count up to 10000 fits them; choose other training timesteps")
    raise OdePairError(
        f"training timesteps {[round(t, 4) for t in off]} (warped with shift {shift} from "
        f"{list(unwarped)}) are not points of the {steps}-step grid with shift {shift}, so the "
        f"teacher's trajectory never passes through them. Grid: "
        f"{[round(float(t), 4) for t in grid]}. To put every training timestep on the grid, "
        f"{hint}.")
  return OdeTimesteps(tuple(float(t) for t in grid), tuple(float(grid[i]) for i in indices),
                      tuple(indices))


def _check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
      0 <= seed <= _MAX_INT32):
    raise OdePairError(f"seed must be an int in [0, 2^31), got {seed!r}.")
  return int(seed)


@functools.partial(jax.jit, static_argnames="latent_shape")
def example_noise(seed: int | jax.Array, example_indices: Any,
                  latent_shape: Sequence[int]) -> jax.Array:
  """The starting noise of examples: a function of (seed, example index) only.

  Args:
    seed: int in [0, 2^31) (an int32 scalar).
    example_indices: [B] ints in [0, 2^31).
    latent_shape: (F, H, W, C), a tuple (static).
  Returns:
    [B, F, H, W, C] float32; row b is `normal(fold_in(key(seed), example_indices[b]), shape)`.
  """
  key = jax.random.key(seed)
  shape = tuple(int(s) for s in latent_shape)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(
      jnp.asarray(example_indices, jnp.int32))


@functools.partial(jax.jit, static_argnames=("module", "latent_shape", "grid", "indices",
                                             "guidance_scale"))
def _pairs(params, seed, example_indices, context, neg_context, *, module, latent_shape, grid,
           indices, guidance_scale):
  noise = example_noise(seed, example_indices, latent_shape)
  clean, traj = euler_sample(module, params, noise, context, neg_context, timesteps=grid,
                             guidance_scale=guidance_scale, return_trajectory=True)
  return jnp.moveaxis(traj[np.asarray(indices)], 0, 1), clean


def generate_pairs(module: Any, params: Any, example_indices: Any, context: Any,
                   neg_context: Any, *, seed: int, latent_shape: Sequence[int],
                   timesteps: OdeTimesteps, guidance_scale: float = 6.0
                   ) -> tuple[jax.Array, jax.Array]:
  """Teacher trajectories from the examples' noise, kept at the training timesteps (jitted).

  Args:
    module, params: the bidirectional teacher (a Wan DiT).
    example_indices: [B] example indices (they pick the noise, with `seed`).
    context, neg_context: [B, L, D] prompt and negative-prompt contexts.
    seed: the build's seed.
    latent_shape: (F, H, W, C).
    timesteps: from `ode_timesteps`.
    guidance_scale: CFG weight on the negative prompt (v = v_neg + w (v_cond - v_neg)).
  Returns:
    (noisy [B, K, F, H, W, C], clean [B, F, H, W, C]), float32: x of
    `euler_sample(..., timesteps=timesteps.grid, return_trajectory=True)` at `timesteps.indices`,
    and its end.
  """
  return _pairs(params, jnp.int32(_check_seed(seed)), jnp.asarray(example_indices, jnp.int32),
                jnp.asarray(context), jnp.asarray(neg_context), module=module,
                latent_shape=tuple(int(s) for s in latent_shape), grid=tuple(timesteps.grid),
                indices=tuple(timesteps.indices), guidance_scale=float(guidance_scale))


# ----------------------------------------------------------------------------------------------
# Building


def features(latent_shape: Sequence[int], num_timesteps: int, store_dtype: str = "bfloat16"):
  """The TFDS features of one example (latents as raw bytes: exact, bfloat16 allowed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  shape = tuple(int(s) for s in latent_shape)
  dtype = build._store_dtype(store_dtype)  # pylint: disable=protected-access
  return tfds.features.FeaturesDict({
      "index": tfds.features.Scalar(np.int64, doc="position of the example in its split"),
      "prompt_index": tfds.features.Scalar(np.int64, doc="row of the prompt dataset"),
      "prompt": tfds.features.Text(doc="the prompt, to check joins with the prompt dataset"),
      "noisy": tfds.features.Tensor(shape=(num_timesteps,) + shape, dtype=dtype, encoding="bytes",
                                    doc="x at the training timesteps: [K, F, H, W, C]"),
      "clean": tfds.features.Tensor(shape=shape, dtype=dtype, encoding="bytes",
                                    doc="the ODE's end x0: [F, H, W, C]"),
  })


def _shard_template(directory: Path, name: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.core.ShardedFileTemplate(
      data_dir=directory, template=build._FILENAME_TEMPLATE,  # pylint: disable=protected-access
      dataset_name=name, split=SPLIT, filetype_suffix="array_record")


def _num_records(path: Path) -> int:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  try:
    return int(reader.num_records())
  finally:
    reader.close()


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
  for flag, v in (("frames", frames), ("height", height), ("width", width),
                  ("batch_size", batch_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise OdePairError(f"{flag} must be an int >= 1, got {v!r}.")
  seed = _check_seed(seed)
  plan_t = ode_timesteps(steps, shift, training_timesteps)
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
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= _MAX_INT32:
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
    done = _start_or_resume(tmp, settings)
    try:
      module, params = pretrained.load(
          teacher_dir, dtype=dtype, **({"param_dtype": param_dtype} if param_dtype else {}))
      _generate_shards(tmp, done, settings, prompts_ds, module, params, plan_t, progress)
      _finish(tmp, settings, prompts_ds, teacher_dir)
    except BaseException:
      kept = _complete_shards(tmp, settings)
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


def _shard_paths(tmp: Path, settings: dict[str, Any], i: int) -> tuple[Path, Path]:
  """(while written, once complete) paths of shard i."""
  final = Path(_shard_template(tmp, settings["name"]).sharded_filepath(
      shard_index=i, num_shards=settings["num_shards"]))
  return final.with_name(final.name + ".tmp"), final


def _shard_range(settings: dict[str, Any], i: int) -> range:
  per = settings["examples_per_shard"]
  return range(i * per, min((i + 1) * per, settings["num_examples"]))


def _complete_shards(tmp: Path, settings: dict[str, Any]) -> list[int]:
  return [i for i in range(settings["num_shards"]) if _shard_paths(tmp, settings, i)[1].is_file()]


def _start_or_resume(tmp: Path, settings: dict[str, Any]) -> set[int]:
  """Writes plan.json into a new partial build, or checks it and lists the complete shards."""
  plan_path = tmp / PLAN
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
  for i in _complete_shards(tmp, settings):
    final = _shard_paths(tmp, settings, i)[1]
    try:
      ok = _num_records(final) == len(_shard_range(settings, i))
    except Exception:  # pylint: disable=broad-except
      ok = False
    if ok:
      done.add(i)
    else:
      final.unlink()
  return done


def _generate_shards(tmp: Path, done: set[int], settings: dict[str, Any],
                     prompts_ds: prompts_lib.PromptDataset, module: Any, params: Any,
                     plan_t: OdeTimesteps, progress: bool) -> None:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  latent_shape = tuple(settings["latent_shape"])
  feats = features(latent_shape, len(plan_t.indices), settings["store_dtype"])
  store = build._store_dtype(settings["store_dtype"])  # pylint: disable=protected-access
  neg_ctx = prompts_ds.negative_context
  neg = np.broadcast_to(neg_ctx[None], (settings["batch_size"],) + neg_ctx.shape)
  initial = sum(len(_shard_range(settings, i)) for i in done)
  with tqdm(total=settings["num_examples"], initial=initial, unit="pair", desc="ODE pairs",
            disable=not progress, dynamic_ncols=True) as bar:
    for shard in range(settings["num_shards"]):
      if shard in done:
        continue
      part, final = _shard_paths(tmp, settings, shard)
      writer = array_record_module.ArrayRecordWriter(os.fspath(part), "group_size:1")
      try:
        _generate_shard(writer, _shard_range(settings, shard), settings, prompts_ds, neg, feats,
                        store, module, params, plan_t, bar)
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
    noisy, clean = generate_pairs(module, params, padded, batch["context"], neg,
                                  seed=settings["seed"], latent_shape=latent_shape,
                                  timesteps=plan_t, guidance_scale=settings["guidance_scale"])
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


def _finish(tmp: Path, settings: dict[str, Any], prompts_ds: prompts_lib.PromptDataset,
            teacher_dir: Path) -> None:
  """TFDS metadata, a read-back check, then the completeness mark."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  shards = [_shard_paths(tmp, settings, i)[1] for i in range(settings["num_shards"])]
  num_bytes = sum(p.stat().st_size for p in shards)
  split = tfds.core.SplitInfo(
      name=SPLIT, shard_lengths=[len(_shard_range(settings, i)) for i in range(len(shards))],
      num_bytes=num_bytes, filename_template=_shard_template(tmp, settings["name"]))
  feats = features(settings["latent_shape"], len(settings["timesteps"]), settings["store_dtype"])
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


# ----------------------------------------------------------------------------------------------
# Reading


def _indices(indices: Any, size: int) -> np.ndarray:
  idx = np.asarray(indices)
  if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
    raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}.")
  idx = idx.astype(np.int64)
  if idx.size and (idx.min() < 0 or idx.max() >= size):
    raise IndexError(f"indices must lie in [0, {size}); got [{idx.min()}, {idx.max()}].")
  return idx


def _single(get_batch, index: Any) -> dict[str, Any]:
  if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
    raise TypeError(f"index must be an int, got {type(index).__name__} (use get_batch for "
                    f"several).")
  b = get_batch([int(index)])
  out = {k: v if k == "timesteps" else v[0] for k, v in b.items()}
  return {k: v.item() if isinstance(v, np.generic) else v for k, v in out.items()}


class OdePairDataset:
  """Random access to an ODE-pair dataset (see the module docstring for the layout).

  Attributes:
    directory: the dataset directory.
    info: the build facts of `ode_pairs.json` (settings, teacher, prompt dataset, ...).
    timesteps: [K] float32, the training timesteps of `noisy` (e.g. [1000, 937.5, 833.3, 625]).
    latent_shape: (F, H, W, C).
    dtype: dtype of returned latents (float32 by default, or the stored bfloat16).
  """

  def __init__(self, directory: str | os.PathLike, *, dtype: Any = np.float32):
    """Opens DIR written by `python -m asd_jax.data.ode_pairs`.

    Raises:
      FileNotFoundError: no such directory.
      prompts.DatasetError: not a complete ODE-pair dataset (e.g. an interrupted build).
    """
    path = Path(directory).expanduser()
    if not path.is_dir():
      raise FileNotFoundError(f"ODE-pair dataset {path} does not exist (build one with "
                              f"`python -m asd_jax.data.ode_pairs --out={path} ...`).")
    marker = path / MARKER
    if not marker.is_file():
      raise prompts_lib.DatasetError(
          f"{path} is not a complete ODE-pair dataset: it has no {MARKER}, which the builder "
          f"writes last (an interrupted build leaves none; continue it with --resume).")
    info = json.loads(marker.read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
      raise prompts_lib.DatasetError(f"{marker} has format_version {info.get('format_version')!r}"
                                     f"; this code reads version {FORMAT_VERSION}.")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
      raise ValueError(f"dtype must be float32 or bfloat16, got {dt}.")
    self.directory, self.info, self.dtype = path, info, dt
    self.timesteps = np.asarray(info["timesteps"], np.float32)
    self.latent_shape = tuple(info["latent_shape"])
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      self._source = tfds.builder_from_directory(os.fspath(path)).as_data_source()[SPLIT]
    except Exception as e:  # TFDS raises assorted types for broken metadata
      raise prompts_lib.DatasetError(f"cannot open {path} as a TFDS ArrayRecord dataset: "
                                     f"{e}") from e
    if len(self._source) != info["num_examples"]:
      raise prompts_lib.DatasetError(f"{path} holds {len(self._source)} examples but {MARKER} "
                                     f"says {info['num_examples']}; rebuild it.")

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return (f"OdePairDataset({str(self.directory)!r}, {len(self)} pairs, timesteps "
            f"{self.timesteps.tolist()}, latents {list(self.latent_shape)})")

  def __getitem__(self, index: int) -> dict[str, Any]:
    """One example: get_batch's entries without the batch axis (ints and str for scalars)."""
    return _single(self.get_batch, index)

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Reads and stacks examples.

    Args:
      indices: [B] example indices in [0, len(self)).
    Returns:
      {'index': int64 [B], 'prompt_index': int64 [B] (rows of the prompt dataset), 'prompt':
      object [B] (str), 'noisy': [B, K, F, H, W, C] (x at 'timesteps'), 'clean': [B, F, H, W, C]
      (x0), 'timesteps': float32 [K]}, latents in `dtype`.
    """
    idx = _indices(indices, len(self))
    getitems = getattr(self._source, "__getitems__", None)  # one batched ArrayRecord read
    records = (getitems(idx.tolist()) if getitems else [self._source[int(i)] for i in idx]
               ) if idx.size else []
    stored = np.array([int(r["index"]) for r in records], np.int64)
    if not np.array_equal(stored, idx):
      raise prompts_lib.DatasetError(f"{self.directory}: records at {idx.tolist()} carry indices "
                                     f"{stored.tolist()}; the dataset is damaged.")
    k = len(self.timesteps)
    prompts = np.empty((len(records),), object)
    text = prompts_lib._text  # pylint: disable=protected-access
    prompts[:] = [text(r["prompt"]) for r in records]
    stack = lambda key, shape: (np.stack([r[key] for r in records]).astype(self.dtype) if records
                                else np.zeros((0,) + shape, self.dtype))
    return {"index": idx,
            "prompt_index": np.array([int(r["prompt_index"]) for r in records], np.int64),
            "prompt": prompts, "noisy": stack("noisy", (k,) + self.latent_shape),
            "clean": stack("clean", self.latent_shape), "timesteps": self.timesteps.copy()}

  def with_context(self, prompt_dataset: prompts_lib.PromptDataset | str | os.PathLike
                   ) -> "OdePairsWithContext":
    """This dataset joined with its prompt dataset: batches gain 'context' and 'length'."""
    return OdePairsWithContext(self, prompt_dataset)


class OdePairsWithContext:
  """ODE pairs with the prompts' contexts; every batch checks that the prompt texts agree.

  Attributes:
    pairs, prompts: the joined OdePairDataset and PromptDataset.
  """

  def __init__(self, pairs: OdePairDataset,
               prompt_dataset: prompts_lib.PromptDataset | str | os.PathLike):
    if not isinstance(prompt_dataset, prompts_lib.PromptDataset):
      prompt_dataset = prompts_lib.PromptDataset(prompt_dataset)
    if len(prompt_dataset) != pairs.info["num_prompts"]:
      raise prompts_lib.DatasetError(
          f"{pairs.directory} was made from a prompt dataset of {pairs.info['num_prompts']} "
          f"prompts ({pairs.info['prompts_dir']}); {prompt_dataset.directory} holds "
          f"{len(prompt_dataset)}.")
    self.pairs, self.prompts = pairs, prompt_dataset

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _single(self.get_batch, index)

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """`OdePairDataset.get_batch` plus 'context' [B, text_len, d_model] (zero from row 'length'
    on, the prompt dataset's dtype) and 'length' int32 [B]."""
    batch = self.pairs.get_batch(indices)
    ctx = self.prompts.get_batch(batch["prompt_index"])
    bad = batch["prompt"] != ctx["prompt"]
    if bad.any():
      raise prompts_lib.DatasetError(
          f"examples {batch['index'][bad].tolist()} of {self.pairs.directory} were made from other "
          f"prompts than rows {batch['prompt_index'][bad].tolist()} of {self.prompts.directory}: "
          f"join the prompt dataset they were made from ({self.pairs.info['prompts_dir']}).")
    return {**batch, "context": ctx["context"], "length": ctx["length"]}


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m asd_jax.data.ode_pairs",
                              description="Generate teacher ODE pairs for the ODE initialisation.")
  p.add_argument("--prompts", required=True, help="prompt dataset (python -m asd_jax.data.build).")
  p.add_argument("--teacher", required=True, help="converted Wan DiT (python -m asd_jax.convert).")
  p.add_argument("--out", required=True, help="dataset directory to create (absent or empty).")
  p.add_argument("--num_examples", type=int, default=None,
                 help="default: one per prompt; more cycle through the prompts.")
  p.add_argument("--frames", type=int, default=21, help="latent frames F.")
  p.add_argument("--height", type=int, default=60, help="latent height H.")
  p.add_argument("--width", type=int, default=104, help="latent width W.")
  p.add_argument("--steps", type=int, default=48, help="teacher Euler steps.")
  p.add_argument("--shift", type=float, default=5.0, help="timestep shift of the grid.")
  p.add_argument("--guidance", type=float, default=6.0, help="CFG weight (negative prompt).")
  p.add_argument("--training_timesteps", default="1000,750,500,250",
                 help="unwarped; warped with --shift they must be grid points.")
  p.add_argument("--seed", type=int, default=0, help="noise seed in [0, 2^31).")
  p.add_argument("--batch_size", type=int, default=1, help="examples per teacher call.")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="teacher compute dtype.")
  p.add_argument("--param_dtype", default=None, choices=("bfloat16", "float32"),
                 help="cast the teacher's params on load (default: as stored).")
  p.add_argument("--store_dtype", default="bfloat16", choices=STORE_DTYPES,
                 help="dtype of the stored latents.")
  p.add_argument("--examples_per_shard", type=int, default=None,
                 help="default: about 1 GiB per shard.")
  p.add_argument("--name", default=DEFAULT_NAME, help="TFDS dataset name.")
  p.add_argument("--resume", action="store_true",
                 help="continue an interrupted build of --out (same settings).")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a non-empty --out once the new build is complete.")
  p.add_argument("--quiet", action="store_true", help="no progress bar.")
  return p


def _check_space(out: Path, tmp: Path, need: int) -> None:
  """Refuses a build the disk at `out` cannot hold (the shards a resumed build has are counted)."""
  from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
  done = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
  try:
    atomic.check_free_space(out, max(0, need - done), "the ODE-pair dataset", "--out")
  except atomic.DestinationError as e:
    raise OdePairError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: 0 done, 2 bad input (nothing created), 1 a failure while generating.
  `--debug` (or ASD_JAX_DEBUG=1) shows the traceback of an expected failure."""
  from asd_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(_main, argv, usage_errors=(ValueError, FileNotFoundError))


def _main(argv: Sequence[str]) -> int:
  from asd_jax import cli  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  try:
    timesteps = [float(t) for t in args.training_timesteps.replace(" ", "").split(",") if t]
  except ValueError:
    raise cli.UsageError(f"--training_timesteps must be comma-separated numbers, got "
                         f"{args.training_timesteps!r}.") from None
  if args.steps < 1:
    raise cli.UsageError(f"--steps must be >= 1, got {args.steps}.")
  if not args.shift > 0 or not np.isfinite(args.shift):
    raise cli.UsageError(f"--shift must be a finite number > 0, got {args.shift}.")
  if not args.guidance >= 0 or not np.isfinite(args.guidance):
    raise cli.UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}.")
  from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
  for flag in ("prompts", "teacher"):
    try:
      atomic.check_disjoint(getattr(args, flag), args.out, f"--{flag}", "--out")
    except atomic.DestinationError as e:
      raise cli.UsageError(str(e)) from None
  out = build_ode_pairs(
      args.prompts, args.teacher, args.out, num_examples=args.num_examples, frames=args.frames,
      height=args.height, width=args.width, steps=args.steps, shift=args.shift,
      guidance_scale=args.guidance, training_timesteps=timesteps, seed=args.seed,
      batch_size=args.batch_size, dtype=args.dtype, param_dtype=args.param_dtype,
      store_dtype=args.store_dtype, examples_per_shard=args.examples_per_shard, name=args.name,
      resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
  print(f"wrote {OdePairDataset(out)!r}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
