"""The run config shared by configs/{ode_init,self_forcing,asd,...}.py, with the paper's values.

Every constant of ALGORITHM.md is a field here; `apply_arg` reads the config argument of
`--config=configs/NAME.py:ARG`: comma-separated `tiny` (a few-step CPU run with tiny random models
and synthetic prompts) and `teacher=1.3b` (a 1.3B teacher for one-GPU setups).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import ml_collections


# The discriminator heads' own learning rate and the ASD noise law: chosen from the toy
# measurement and the update-size argument in README (Training) and configs/asd.py, not the
# paper's (it gives neither; Self Forcing trains its GAN heads at the critic's 4e-7, under which
# a fresh head barely moves in 3,000 steps).
HEADS_LR = 1e-4
ASD_T_LAW = "uniform"


def base_config(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage  # pretrain | ode_init | dmd | asd (| toy: the whole toy-world pipeline)
  c.seed = 0
  c.dtype = "bfloat16"  # compute dtype; params and optimizer states stay float32
  c.remat = "full"  # remat policy of every Wan block (gradient checkpointing)
  c.chunk_frames = 3
  c.shift = 5.0
  c.timesteps = (1000.0, 750.0, 500.0, 250.0)  # warped with `shift`: 1000, 937.5, 833.3, 625
  c.latent = ml_collections.ConfigDict(dict(frames=21, height=60, width=104))  # 832x480, 81 fr.
  c.models = ml_collections.ConfigDict()
  c.models.student = ml_collections.ConfigDict(dict(preset="1.3b"))
  # The frozen teacher is stored in bfloat16: Self Forcing wraps it in FSDP with bfloat16
  # mixed precision, so every one of its params enters the forward rounded to bfloat16 anyway;
  # stored that way it takes half the memory (28 GB instead of 57 GB for Wan 14B). Set
  # models.teacher.param_dtype = "float32" to keep float32 storage.
  c.models.teacher = ml_collections.ConfigDict(dict(preset="14b", param_dtype="bfloat16"))
  c.models.critic = ml_collections.ConfigDict(dict(preset="1.3b"))
  # Converted model directories (`python -m asd_jax.convert wan`, or a previous stage's export).
  c.init = ml_collections.ConfigDict(dict(student="", teacher="", critic=""))
  c.data = ml_collections.ConfigDict(dict(prompts="", ode_pairs="", synthetic_prompts=64,
                                          text_len=512, toy=False))  # toy: configs/toy.py
  c.batch_size = 64  # global
  # Samples per device in one forward/backward. 0: the whole global batch at once (batch_size /
  # batch devices each). n > 0: every step accumulates its gradient over batch_size / (n x batch
  # devices) microbatches of n samples a device; the update is still the whole batch's, so a
  # slice smaller than Self Forcing's 64 GPUs keeps the global batch of 64.
  c.device_batch = 0
  c.total_steps = 3000  # generator updates (update-ratio cycles)
  c.update_ratio = (1, 4, 1)  # generator : critic : discriminator
  c.optim = ml_collections.ConfigDict(dict(
      gen_lr=2e-6, critic_lr=4e-7, heads_lr=HEADS_LR,
      b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=10.0))
  c.ema = ml_collections.ConfigDict(dict(decay=0.99, start=200))
  c.dmd = ml_collections.ConfigDict(dict(guidance=3.0, t_min=20.0, t_max=980.0))
  # t_law: the noise level of the ASD noising (asd_jax.distill.losses.T_LAWS: 'dmd' = DMD's
  # law, 'schedule' = the paper's Algorithm 1, 'uniform' = this project's); r_form: the R1/R2
  # difference ('eq6' = the paper's Eq. 6, 'sigma' = Self Forcing's, divided by sigma). auc_every:
  # every K generator steps the discriminator's held-out AUC on a fixed pool of auc_samples
  # n-step vs (n+1)-step samples is logged per n (0: never); auc_patience evaluations in a row
  # with every AUC inside the chance band log a warning. Defaults and why: README, Training.
  c.asd = ml_collections.ConfigDict(dict(
      alpha=0.01, r_lambda=600.0, r_sigma=0.05, taps=(12, 21, 29), num_queries=4, mlp_dim=1024,
      t_law=ASD_T_LAW, r_form="eq6", auc_every=100, auc_samples=64, auc_patience=5))
  # ODE pairs made by the loop itself when no data.ode_pairs is given: `steps` Euler steps,
  # CFG `guidance`; `pool` 0 solves fresh pairs every step, N > 0 solves N examples once at
  # start and trains on them as on a built pair dataset.
  c.ode = ml_collections.ConfigDict(dict(steps=48, guidance=6.0, pool=0))
  # Stage 'pretrain' (flow matching on data; the toy world's teacher): timestep law and the
  # share of rows trained unconditionally (on the negative context) for CFG.
  c.pretrain = ml_collections.ConfigDict(dict(shift=1.0, t_min=1.0, t_max=1000.0,
                                              cfg_dropout=0.1))
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3))
  c.log_every = 1
  c.max_nonfinite = 20  # stop after this many non-finite updates in a row
  c.progress = True
  c.export = True  # write the EMA generator to WORKDIR/export at the end
  return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    if token == "tiny":
      _tiny(c)
    elif token.startswith("teacher="):
      c.models.teacher.preset = token.split("=", 1)[1]
    else:
      raise ValueError(f"unknown config argument {token!r}; use 'tiny' and/or 'teacher=1.3b'.")
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Tiny random models, synthetic prompts, 6x4x4 latents: a few steps on a laptop CPU."""
  for name in ("student", "teacher", "critic"):
    c.models[name] = ml_collections.ConfigDict(dict(preset="tiny", text_dim=32, in_channels=16,
                                                    out_channels=16))
  c.dtype = "float32"
  c.remat = "none"
  c.latent = ml_collections.ConfigDict(dict(frames=6, height=4, width=4))
  c.data.synthetic_prompts = 8
  c.data.text_len = 16
  c.batch_size = 1
  c.device_batch = 0
  c.mesh_shape = (-1, 1, 1)
  c.total_steps = 3
  c.ema.start = 1
  c.asd.taps = (0, 1)
  c.asd.num_queries = 2
  c.asd.mlp_dim = 32
  c.asd.auc_samples = 4
  c.ode.steps = 8
  c.checkpoint.every = 2


# ------------------------------------------------------------------------------------ validation

STAGES = ("pretrain", "ode_init", "dmd", "asd")
_DTYPES = ("float32", "bfloat16", "float16")


def _get(c: ml_collections.ConfigDict, name: str) -> Any:
  for part in name.split("."):
    c = c[part]
  return c


def require(c: ml_collections.ConfigDict, name: str, ok: Callable[[Any], bool],
            what: str) -> Any:
  """The value of field `name` if `ok(value)`; else a ValueError naming the field and the rule."""
  value = _get(c, name)
  try:
    good = ok(value)
  except TypeError:
    good = False
  if not good:
    raise ValueError(f"{name} must be {what}, got {value!r}; give --config.{name}=VALUE.")
  return value


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(config: ml_collections.ConfigDict, *, mesh: Any = None,
             check_paths: bool = True) -> None:
  """Rejects a stage config that cannot work, naming the field, before anything is built.

  Every numeric field is checked against its range (learning rates > 0, betas in [0, 1), ...),
  the shapes against each other (frames a multiple of chunk_frames, taps within the critic's
  layers, ...) and, with `check_paths`, the directories of `init.*` and `data.*` against what
  they must hold (a converted Wan DiT of the configured architecture, a built dataset with the
  config's timesteps). With `mesh`, the batch is checked against the devices it is split over.

  Raises:
    ValueError: with the field's config name, the rule and what to give instead.
    FileNotFoundError: a directory of `init.*` or `data.*` that does not exist.
  """
  c = config
  if c.stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {c.stage!r}.")
  require(c, "seed", is_int, "an integer")
  require(c, "dtype", lambda v: v in _DTYPES, f"one of {_DTYPES}")
  from asd_jax.models.wan_config import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  require(c, "remat", lambda v: v in REMAT_POLICIES, f"one of {tuple(REMAT_POLICIES)}")
  chunk = require(c, "chunk_frames", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  for name in ("latent.frames", "latent.height", "latent.width"):
    require(c, name, lambda v: is_int(v) and v >= 1, "an integer >= 1")
  F, H, W = c.latent.frames, c.latent.height, c.latent.width
  if F % chunk:
    raise ValueError(f"latent.frames {F} is not a multiple of chunk_frames {chunk}.")
  if H % 2 or W % 2:
    raise ValueError(f"latent.height and latent.width ({H}x{W}) must be even (the DiT's 2x2 "
                     f"patches).")
  require(c, "shift", lambda v: is_number(v) and v > 0, "a number > 0")
  from asd_jax.diffusion import validate_timesteps  # pylint: disable=g-import-not-at-top
  validate_timesteps(c.timesteps, "timesteps")

  # Sizes, intervals, counts.
  require(c, "batch_size", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  require(c, "device_batch", lambda v: is_int(v) and v >= 0,
          "an integer >= 0 (0: the whole batch at once)")
  require(c, "total_steps", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  require(c, "log_every", lambda v: is_int(v) and v >= 1, "an integer >= 1 (log every N steps)")
  require(c, "max_nonfinite", lambda v: is_int(v) and v >= 1,
          "an integer >= 1 (non-finite updates in a row before the run stops)")
  require(c, "checkpoint.every", lambda v: is_int(v) and v >= 1,
          "an integer >= 1 (save every N steps)")
  require(c, "checkpoint.keep", lambda v: is_int(v) and v >= 1,
          "an integer >= 1 (with 0 no checkpoint is kept and a restarted run starts again from "
          "step 0)")
  require(c, "data.synthetic_prompts", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  require(c, "data.text_len", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  require(c, "mesh_shape", lambda v: len(v) == 3 and all(
      is_int(s) and (s >= 1 or s == -1) for s in v) and list(v).count(-1) <= 1,
      "three sizes (data, fsdp, tensor), each >= 1 or one of them -1")

  # Optimizer, EMA.
  for name in ("optim.gen_lr", "optim.critic_lr"):
    require(c, name, lambda v: is_number(v) and v > 0, "a learning rate > 0")
  for name in ("optim.b1", "optim.b2"):
    require(c, name, lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)")
  require(c, "optim.eps", lambda v: is_number(v) and v > 0, "a number > 0")
  require(c, "optim.weight_decay", lambda v: is_number(v) and v >= 0, "a number >= 0")
  require(c, "optim.clip_norm", lambda v: is_number(v) and v > 0,
          "a number > 0 (the global gradient norm is clipped to it)")
  require(c, "ema.decay", lambda v: is_number(v) and 0 <= v <= 1, "in [0, 1]")
  require(c, "ema.start", lambda v: is_int(v) and v >= 0, "an integer >= 0 (a generator step)")

  # DMD, ASD, ODE pairs, pretraining.
  require(c, "dmd.guidance", lambda v: is_number(v) and v >= 0, "a number >= 0")
  _t_range(c, "dmd")
  require(c, "asd.alpha", lambda v: is_number(v) and v >= 0, "a number >= 0 (0: no ASD loss)")
  require(c, "asd.r_lambda", lambda v: is_number(v) and v >= 0, "a number >= 0")
  require(c, "asd.r_sigma", lambda v: is_number(v) and v > 0,
          "a number > 0 (the R1/R2 noise scale)")
  require(c, "asd.taps", lambda v: len(v) >= 1 and all(is_int(t) for t in v) and
          len(set(v)) == len(v), "a non-empty tuple of distinct block indices")
  require(c, "asd.num_queries", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  require(c, "asd.mlp_dim", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  require(c, "optim.heads_lr", lambda v: is_number(v) and v > 0,
          "a learning rate > 0 (the discriminator heads' own)")
  from asd_jax.distill.losses import R_FORMS, T_LAWS  # pylint: disable=g-import-not-at-top
  require(c, "asd.t_law", lambda v: v in T_LAWS, f"one of {T_LAWS}")
  require(c, "asd.r_form", lambda v: v in R_FORMS, f"one of {R_FORMS}")
  require(c, "asd.auc_every", lambda v: is_int(v) and v >= 0,
          "an integer >= 0 (log the discriminator's held-out AUC every N steps; 0: never)")
  require(c, "asd.auc_samples", lambda v: is_int(v) and v >= 2,
          "an integer >= 2 (samples a side in the AUC pool)")
  require(c, "asd.auc_patience", lambda v: is_int(v) and v >= 1,
          "an integer >= 1 (AUC evaluations at chance in a row before a warning)")
  require(c, "ode.steps", lambda v: is_int(v) and v >= 1, "an integer >= 1 (Euler steps)")
  require(c, "ode.guidance", lambda v: is_number(v) and v >= 0, "a number >= 0")
  require(c, "ode.pool", lambda v: is_int(v) and v >= 0,
          "an integer >= 0 (0: fresh pairs every step)")
  require(c, "pretrain.shift", lambda v: is_number(v) and v > 0, "a number > 0")
  _t_range(c, "pretrain")
  require(c, "pretrain.cfg_dropout", lambda v: is_number(v) and 0 <= v <= 1, "in [0, 1]")

  ratio = require(c, "update_ratio", lambda v: len(v) == 3 and v[0] >= 1 and all(
      is_int(r) and r >= 0 for r in v), "(generator >= 1, critic >= 0, discriminator >= 0) updates")
  if c.stage == "asd" and ratio[2] < 1:
    raise ValueError("stage 'asd' needs discriminator updates: update_ratio[2] >= 1.")
  if c.stage == "dmd" and ratio[2]:
    raise ValueError(f"stage 'dmd' has no discriminator: set update_ratio[2] to 0, got "
                     f"{tuple(ratio)}.")
  if c.stage != "asd" and c.asd.alpha:
    raise ValueError(f"asd.alpha = {c.asd.alpha} but stage is {c.stage!r}; use stage 'asd'.")

  # Networks.
  from asd_jax.train.programs import ANALYTIC, wan_config  # pylint: disable=g-import-not-at-top
  analytic = c.models.teacher.preset == ANALYTIC
  if analytic and not c.data.toy:
    raise ValueError("the analytic teacher exists for the toy world only (models.teacher.preset "
                     "'analytic'): set data.toy = True.")
  if c.data.toy:
    world_shape = (c.toy.frames, c.toy.height, c.toy.width)
    if (F, H, W) != world_shape:
      raise ValueError(f"latent {(F, H, W)} differs from the toy world's {world_shape}.")
  names = ("student", "critic") if analytic else ("student", "teacher", "critic")
  models = {}
  for name in names:
    try:
      models[name] = wan_config(c.models[name], c.dtype, c.remat)
    except (TypeError, ValueError) as e:
      raise ValueError(f"models.{name}: {e}") from None
  if c.data.toy:
    for name, cfg in models.items():
      if (cfg.in_channels, cfg.out_channels, cfg.text_dim) != (c.toy.channels, c.toy.channels,
                                                                 c.toy.text_dim):
        raise ValueError(f"models.{name} must read {c.toy.channels}-channel latents and "
                         f"{c.toy.text_dim}-wide text to fit the toy world.")
  if c.stage == "asd":
    layers = models["critic"].num_layers
    if any(not 0 <= tap < layers for tap in c.asd.taps):
      raise ValueError(f"asd.taps {tuple(c.asd.taps)} index blocks outside the critic's "
                       f"{layers} (0 .. {layers - 1}).")
  if not analytic and models["teacher"].text_dim != models["student"].text_dim:
    raise ValueError("models.teacher and models.student must read the same text embeddings "
                     "(text_dim).")
  if analytic and c.stage in ("dmd", "asd") and not c.init.critic and check_paths:
    raise ValueError("with the analytic teacher the critic needs its own init (init.critic): "
                     "a pretrained Wan directory.")
  if check_paths:
    _check_paths(c, models)
  if mesh is not None:
    check_mesh(c, mesh)


def _t_range(c: ml_collections.ConfigDict, group: str) -> None:
  lo = require(c, f"{group}.t_min", lambda v: is_number(v) and 0 <= v <= 1000, "in [0, 1000]")
  hi = require(c, f"{group}.t_max", lambda v: is_number(v) and 0 <= v <= 1000, "in [0, 1000]")
  if not lo < hi:
    raise ValueError(f"{group}.t_min {lo} must be below {group}.t_max {hi}.")


def _check_paths(c: ml_collections.ConfigDict, models: dict[str, Any]) -> None:
  """init.* hold converted Wan DiTs of the configured architecture; data.* are built datasets."""
  import json  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from asd_jax.models.wan_config import WanConfig  # pylint: disable=g-import-not-at-top
  distill = c.stage in ("dmd", "asd")
  # What each network loads (the loop's order): the critic starts from init.critic, else from
  # the teacher's directory.
  loads = {"student": c.init.student}
  if distill:
    loads["critic"] = c.init.critic or c.init.teacher
  if "teacher" in models and c.stage != "pretrain":
    loads["teacher"] = c.init.teacher
  for name in ("student", "teacher", "critic"):
    path = c.init.get(name)
    if path and not Path(path).is_dir():
      raise FileNotFoundError(f"init.{name} = {path} is not a directory; give a converted Wan "
                              f"DiT (`python -m asd_jax.convert wan`) or a training's export.")
  for name, path in loads.items():
    if not path:
      continue
    field = f"init.{name}" if c.init.get(name) else "init.teacher"
    meta_path = Path(path) / "config.json"
    try:
      meta = json.loads(meta_path.read_text())
      kind, arch = meta["kind"], meta["config"]
    except (OSError, ValueError, KeyError, TypeError):
      hint = (f" (a converted release: give {Path(path) / 'dit'})"
              if (Path(path) / "dit" / "config.json").is_file() else "")
      raise ValueError(f"{field} = {path} is not a converted model directory (no readable "
                       f"config.json with 'kind' and 'config'){hint}; give a converted Wan DiT "
                       f"(`python -m asd_jax.convert wan`) or a training's export.") from None
    if kind != "wan":
      raise ValueError(f"{field} = {path} holds a {kind!r} checkpoint, not a Wan DiT; give the "
                       f"DiT's directory (a release's `dit`, `python -m asd_jax.convert wan`, or "
                       f"a training's export).")
    cfg = models[name]
    wrong = [f for f in WanConfig.ARCH_FIELDS if f in arch and
             (tuple(arch[f]) if isinstance(arch[f], list) else arch[f]) != getattr(cfg, f)]
    if wrong:
      have = ", ".join(f"{f} {arch[f]}" for f in wrong)
      want = ", ".join(f"{f} {getattr(cfg, f)}" for f in wrong)
      raise ValueError(f"{field} = {path} holds a model with {have}; models.{name} asks for "
                       f"{want} (set models.{name}.preset or its fields to match).")
  if c.data.prompts and not Path(c.data.prompts).is_dir():
    raise FileNotFoundError(f"data.prompts = {c.data.prompts} is not a directory; build one with "
                            f"`python -m asd_jax.data.build --out=DIR ...`.")
  if c.data.ode_pairs:
    if c.stage != "ode_init":
      raise ValueError(f"data.ode_pairs is read by stage 'ode_init' only; stage is {c.stage!r}.")
    from asd_jax.data.ode_pairs.layout import MARKER  # pylint: disable=g-import-not-at-top
    from asd_jax.diffusion import warp_timesteps  # pylint: disable=g-import-not-at-top
    marker = Path(c.data.ode_pairs) / MARKER
    if not Path(c.data.ode_pairs).is_dir():
      raise FileNotFoundError(f"data.ode_pairs = {c.data.ode_pairs} is not a directory; build one "
                              f"with `python -m asd_jax.data.ode_pairs --out=DIR ...`.")
    if marker.is_file():  # an incomplete dataset is reported by its reader
      info = json.loads(marker.read_text())
      stored = [float(t) for t in info.get("timesteps", ())]
      training = list(warp_timesteps(c.timesteps, c.shift))
      if len(stored) != len(training) or any(abs(a - b) > 1e-3 for a, b in zip(stored,
                                                                                training)):
        raise ValueError(f"data.ode_pairs = {c.data.ode_pairs} holds timesteps {stored}; the "
                         f"config trains on {training} (timesteps {tuple(c.timesteps)} warped "
                         f"with shift {c.shift}): give the same timesteps and shift, or build "
                         f"the pairs again.")
      shape = tuple(info.get("latent_shape", ()))
      want = (c.latent.frames, c.latent.height, c.latent.width)
      if shape[:3] != want:
        raise ValueError(f"data.ode_pairs = {c.data.ode_pairs} holds latents {shape}; the config's "
                         f"latent is {want} (set latent.frames/height/width to match).")


def check_mesh(config: ml_collections.ConfigDict, mesh: Any) -> None:
  """The batch against the devices it is split over (batch -> data x fsdp)."""
  from asd_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
  axes = shd.batch_sharding(mesh).spec[0] or ()
  devices = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  B, n = config.batch_size, config.device_batch
  if B % devices:
    raise ValueError(f"batch_size {B} is not a multiple of the {devices} devices the batch is "
                     f"split over (mesh {dict(mesh.shape)}, batch -> data x fsdp); give "
                     f"--config.batch_size=k*{devices} or another mesh_shape.")
  if n and B % (n * devices):
    raise ValueError(f"batch_size {B} is not a multiple of device_batch {n} x the {devices} "
                     f"devices the batch is split over; change one of them.")
