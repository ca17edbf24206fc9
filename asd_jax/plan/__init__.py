"""Does a config fit its accelerator? Every program it runs, compiled for a target not attached.

  python -m asd_jax.plan --config=configs/asd.py --target=v5p-8 [--json=plan.json] [--sample]

The programs are the ones the trainer and the sampler run, built by the same functions
(`asd_jax.train.programs.build_programs`, `asd_jax.sample.make_sampler` / `make_decoder`), with the
config's shapes, dtypes, shardings and donation, over a mesh of the target's compile-only devices
(`asd_jax.targets`); their inputs are ShapeDtypeStructs, so nothing of real size is allocated.
For each program, per device: argument, output, alias (donated), temporary and total bytes
against the device's memory, the analytic FLOPs (`asd_jax.plan.flops`) and, on TPU, XLA's FLOPs and
estimated seconds. A program the TPU compiler refuses for memory does not fit (its message is kept).
Everything here can be called from Python: `plan_training`, `plan_sampler`, `report`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asd_jax import targets
from asd_jax.plan import breakdown as bd
from asd_jax.plan import flops as fl

GB = 1e9
NOTES = (
    "Bytes are XLA's memory analysis of the compiled program, per device: total = argument + "
    "output - alias (donated buffers reused) + temporaries; the program's code is not included.",
    "XLA FLOPs and seconds are XLA's cost model (TPU only), not a measurement. It counts a loop "
    "body once whatever its trip count (the scanned layer stack, the chunk scan, the rollout's "
    "no-gradient loop), so for scanned programs they are lower bounds, and it prices a Pallas "
    "kernel (splash attention) at about zero.",
    "Analytic FLOPs: matmul FLOPs of every DiT forward the program must run (2 per multiply-add, "
    "backward = 2x forward, no remat); training steps are expectations over their random exit "
    "index; see asd_jax/plan/flops.py.",
    "other GB: buffers the running command holds on the device besides the program's own (the "
    "sampler: the VAE's params; the VAE decode: the DiT's params and the video's latents); the "
    "verdict and the headroom count them.",
    "GPU: jax preallocates 75% of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says "
    "otherwise; the verdict is against the whole memory the driver reports.",
    "Where the time goes: a roofline model of the optimized HLO (asd_jax/plan/breakdown.py), not "
    "a measurement: every loop body times its trip count (one whose count is not static is "
    "counted once and named), matmul FLOPs at the bf16 peak, bytes in and out of each top-level "
    "op at the HBM bandwidth (an approximation), collectives at the data sheet's interconnect "
    "bandwidth, the attention kernels XLA cannot see from their analytic FLOPs at an assumed "
    f"{bd.DEFAULT_KERNEL_EFFICIENCY:.0%} of peak; the parts are summed (no overlap). Compiled/"
    "analytic FLOPs = (matmul FLOPs x devices + kernel attention) / analytic: remat "
    "recomputation, replicated work and FLOPs outside the analytic convention show above 1.",
)


class BadInput(ValueError):
  """An unknown target, a mesh that does not match it, or a config that cannot work."""


@dataclasses.dataclass
class Entry:
  """One compiled program's figures (bytes per device; FLOPs per program, all devices)."""
  name: str
  fits: bool
  memory: dict[str, int] = dataclasses.field(default_factory=dict)
  hbm: int = 0
  analytic_flops: float | None = None
  xla_flops: float | None = None  # per device, XLA's cost model
  xla_seconds: float | None = None  # XLA's estimate of the program's time
  xla_share_of_peak: float | None = None  # xla_flops / xla_seconds / peak
  compile_seconds: float = 0.0
  error: str | None = None  # the compiler's refusal (out of memory) or another failure
  error_detail: str | None = None  # its whole message
  # Bytes other buffers hold on each device while the program runs (e.g. the DiT's params during
  # the VAE decode): counted against the device's memory with the program's own total.
  resident: int = 0
  breakdown: dict[str, Any] | None = None  # where the time would go (`bd.Breakdown.to_dict`)

  @property
  def headroom(self) -> int | None:
    return self.hbm - self.memory["total"] - self.resident if self.memory else None

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["headroom"] = self.headroom
    return d


def _oom_bytes(message: str) -> int | None:
  """The memory a refused TPU program asked for ("... temporaries (188.20G) exceeds ...")."""
  m = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", message)
  if not m:
    return None
  return int(float(m.group(1)) * 1024**" KMGT".index(m.group(2)))


def argument_bytes(args: Sequence[Any]) -> int:
  """Bytes of abstract arguments held by the most loaded device, from their shardings."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(args):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      continue
    shard = sharding.shard_shape(leaf.shape)
    size = math.prod(shard) * leaf.dtype.itemsize  # a PRNG key's dtype has one too
    for device in sharding.device_set:
      per_device[device] = per_device.get(device, 0) + int(size)
  return max(per_device.values(), default=0)


def compile_program(name: str, fn: Callable, args: Sequence[Any], mesh, target: targets.Target,
                    analytic_flops: float | None = None,
                    kernel_efficiency: float = bd.DEFAULT_KERNEL_EFFICIENCY,
                    resident: int = 0) -> Entry:
  """Lowers and compiles `fn(*args)` under `mesh` (abstract args) and judges its memory, with
  `resident` bytes held on each device by other buffers meanwhile; adds where its time would go
  (`asd_jax.plan.breakdown`, attention kernels at `kernel_efficiency`)."""
  t0 = time.perf_counter()
  entry = Entry(name=name, fits=False, hbm=target.hbm_bytes_per_device,
                analytic_flops=analytic_flops, resident=int(resident))
  try:
    with jax.set_mesh(mesh):
      compiled = fn.lower(*args).compile(compiler_options=targets.compiler_options(target))
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    entry.compile_seconds = time.perf_counter() - t0
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text:
      needed = _oom_bytes(text)
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      entry.error = "out of memory: " + " ".join(lines[:2])[:400]
      entry.error_detail = text[:20000]
      if needed:
        # The compiler names the temporaries only; the arguments follow from their shardings.
        # Outputs are taken as donated into the arguments, so the total is a lower bound.
        args_bytes = argument_bytes(args)
        entry.memory = {"argument": args_bytes, "temp": needed, "total": args_bytes + needed}
      return entry
    entry.error = f"{type(e).__name__}: {text.splitlines()[0][:400] if text else ''}"
    entry.error_detail = text[-20000:]  # the cause is at the end of a traceback
    return entry
  entry.compile_seconds = time.perf_counter() - t0
  stats = targets.compile_stats(compiled)
  entry.memory = {k: int(stats[k]) for k in ("argument", "output", "alias", "temp", "total",
                                             "generated_code")}
  entry.fits = entry.memory["total"] + entry.resident <= entry.hbm
  entry.xla_flops, entry.xla_seconds = stats.get("flops"), stats.get("optimal_seconds")
  if entry.xla_seconds is not None and entry.xla_seconds <= 0:
    entry.xla_seconds = None  # no estimate (XLA reports a negative time for some programs)
  if entry.xla_flops and entry.xla_seconds:
    peak = target.peak_bf16_flops_per_device
    entry.xla_share_of_peak = entry.xla_flops / entry.xla_seconds / peak
  try:
    entry.breakdown = bd.breakdown(compiled, target, analytic_flops,
                                   getattr(analytic_flops, "attention", None),
                                   kernel_efficiency=kernel_efficiency,
                                   xla_seconds=entry.xla_seconds).to_dict()
  except Exception as e:  # pylint: disable=broad-except  (a model never costs the memory verdict)
    entry.breakdown = {"error": f"{type(e).__name__}: {e}"[:400]}
  return entry


# ------------------------------------------------------------------------------------------ setup


def resolve(config, target_name: str | None, memory_fraction: float = 1.0):
  """Checks the target, the config and the mesh before anything compiles.

  target_name: a target (`asd_jax.targets`), or None for the local devices (`jax.devices()`; the
    returned target is None then).
  memory_fraction: the share of each device's memory the plan may use (the target's
  `hbm_bytes_per_device` is scaled by it).

  Returns:
    (target, mesh, world).
  Raises:
    BadInput: with a message that lists the valid choices.
    RuntimeError: libtpu or the CUDA plugin is missing (the message names the pip command).
  """
  from asd_jax.train import loop, sharding as shd  # pylint: disable=g-import-not-at-top
  target = None
  try:
    if target_name is not None:
      target = targets.parse(target_name)
  except ValueError as e:
    raise BadInput(str(e)) from None
  if config.stage == "toy":
    raise BadInput(f"stage 'toy' runs the whole toy pipeline on a CPU; plan one of its stages "
                   f"instead: stage in {loop.STAGES}.")
  try:
    loop.validate(config)
  except (ValueError, FileNotFoundError) as e:
    raise BadInput(f"the config fails validation: {e}") from None
  devices = targets.devices(target) if target is not None else jax.devices()
  try:
    mesh = shd.make_mesh(tuple(config.mesh_shape), devices=devices)
  except ValueError as e:
    where = f"target {target.name}" if target is not None else "this host"
    raise BadInput(f"{e} ({where} has {len(devices)} devices: give "
                   f"--config.mesh_shape=(data,fsdp,tensor) with that product, or -1 on one "
                   f"axis)") from None
  axes = shd.batch_sharding(mesh).spec[0] or ()
  batch_axes = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  if config.batch_size % batch_axes:
    raise BadInput(f"batch_size {config.batch_size} is not a multiple of the {batch_axes} devices "
                   f"the batch is split over (mesh {dict(mesh.shape)}, batch -> data x fsdp); "
                   f"give --config.batch_size=k*{batch_axes}.")
  if not 0 < memory_fraction <= 1:
    raise BadInput(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
  if memory_fraction != 1 and target is not None:
    target = dataclasses.replace(
        target, hbm_bytes_per_device=int(target.hbm_bytes_per_device * memory_fraction))
  return target, mesh, loop.toy_world(config)


# ------------------------------------------------------------------------------------------ plans


def program_name(stage: str, step: str) -> str:
  """The name a plan gives the training step `step` (a `Programs.steps` key) of `stage`."""
  if step == "generator":
    return {"ode_init": "ode_regression", "pretrain": "pretrain"}.get(stage, "generator")
  return {"critic": "critic", "disc": "discriminator"}[step]


def training_jobs(config, mesh, world=None):
  """The programs of the config's stage (`build_programs`) and, for each, its plan job.

  Returns:
    (programs, jobs): jobs are (name, jitted fn, abstract args, analytic FLOPs), the state's
    initialisation first, then each step of `programs.steps` in its order (names: `program_name`).
  """
  from asd_jax.train.programs import build_programs  # pylint: disable=g-import-not-at-top
  c = config
  progs = build_programs(c, mesh, world=world)
  kw = dict(stage=c.stage, student=progs.student_cfg, critic=progs.critic_cfg,
            teacher=progs.teacher_cfg, taps=tuple(c.asd.taps), batch=c.batch_size,
            latent=progs.latent, chunk_frames=c.chunk_frames,
            num_timesteps=len(progs.timesteps), text_len=c.data.text_len, alpha=c.asd.alpha)
  jobs = [("state_init", progs.init, progs.args["init"], 0.0)]
  for key, fn in progs.steps.items():
    jobs.append((program_name(c.stage, key), fn, progs.args[key], fl.step_flops(key, **kw)))
  return progs, jobs


def plan_training(config, target: targets.Target, mesh, world=None,
                  only: Sequence[str] | None = None,
                  log: Callable[[str], None] = lambda _: None,
                  kernel_efficiency: float = bd.DEFAULT_KERNEL_EFFICIENCY) -> list[Entry]:
  """Compiles the state's initialisation and every step the config's stage runs."""
  _, jobs = training_jobs(config, mesh, world)
  return _compile_jobs(jobs, mesh, target, only, log, kernel_efficiency)


def _compile_jobs(jobs: Sequence[tuple[str, Callable, Sequence[Any], float | None]], mesh,
                  target: targets.Target, only: Sequence[str] | None,
                  log: Callable[[str], None],
                  kernel_efficiency: float = bd.DEFAULT_KERNEL_EFFICIENCY) -> list[Entry]:
  """Compiles each (name, fn, args, analytic FLOPs[, resident bytes]) job, or only those named in
  `only`."""
  _check_only(only, [j[0] for j in jobs])
  out = []
  for name, fn, args, flops, *resident in jobs:
    if only and name not in only:
      continue
    log(f"compiling {name} ...")
    out.append(compile_program(name, fn, args, mesh, target, flops,
                               kernel_efficiency=kernel_efficiency,
                               resident=resident[0] if resident else 0))
    log(f"  {_line(out[-1])}")
  return out


def _check_only(only: Sequence[str] | None, names: Sequence[str]) -> None:
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise BadInput(f"--only names {unknown}; this plan's programs are {', '.join(names)}.")


def sample_request(argv: Sequence[str] = ()):
  """The sample CLI's request (schedules, sizes) for its flags `argv` (its defaults otherwise)."""
  from asd_jax import sample  # pylint: disable=g-import-not-at-top
  args = sample.parser().parse_args(["--prompt=plan", *argv])
  return args, sample.plan(args)


def plan_sampler(config, target: targets.Target, mesh, sample_argv: Sequence[str] = (),
                 param_dtype: str = "float32", only: Sequence[str] | None = None,
                 log: Callable[[str], None] = lambda _: None,
                 kernel_efficiency: float = bd.DEFAULT_KERNEL_EFFICIENCY) -> list[Entry]:
  """Compiles the chunk sampler of the config's student and the streaming decode of one chunk.

  The generator is the student's architecture as `python -m asd_jax.sample` loads it (compute
  dtype --dtype, params stored as `param_dtype`: float32 unless converted otherwise); the VAE is
  the Wan 2.1 VAE; batch 1, everything replicated over the mesh (the sampler runs on one device).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from asd_jax import sample  # pylint: disable=g-import-not-at-top
  from asd_jax.models import vae as vae_lib, wan  # pylint: disable=g-import-not-at-top
  from asd_jax.train.programs import wan_config  # pylint: disable=g-import-not-at-top
  args, req = sample_request(sample_argv)
  cfg = wan_config(config.models.student, args.dtype, "none").replace(param_dtype=param_dtype)
  rep = NamedSharding(mesh, P())

  def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), tree)

  F, (h, w) = req.latent_frames, req.latent_hw
  text_len = config.data.text_len
  dit = wan.WanModel(cfg)
  # The progress callback compiles for a TPU without the device, not for a GPU (jax asks the GPU
  # client for it): left out there, it moves no data the plan would count.
  on_chunk = (lambda _: None) if target.platform == "tpu" else None
  sampler = sample.make_sampler(dit, req, cache_frames=args.cache_frames,
                                sink_frames=args.sink_frames, on_chunk=on_chunk)
  sampler_args = (abstract(wan.abstract_params(cfg)),
                  jax.ShapeDtypeStruct((1, text_len, cfg.text_dim), jnp.float32, sharding=rep),
                  jax.ShapeDtypeStruct((1, F, h, w, cfg.in_channels), jnp.float32, sharding=rep),
                  abstract(jax.eval_shape(lambda: jax.random.key(0))))
  n = F // sample.CHUNK_FRAMES
  steps = [len(req.first)] + [len(req.later)] * (n - 1)
  analytic = fl.generation_flops(cfg, 1, (F, h, w), sample.CHUNK_FRAMES, steps, text_len,
                                 refill_last=False, cache_frames=args.cache_frames)
  vcfg = vae_lib.VAEConfig(dtype=args.dtype, param_dtype=param_dtype)
  vae = vae_lib.WanVAE(vcfg)
  decoder = sample.make_decoder(vae)
  state0 = vae.init_decode_state(1, h, w)
  chunk = jax.ShapeDtypeStruct((1, sample.CHUNK_FRAMES, h, w, vcfg.z_dim), jnp.float32,
                               sharding=rep)
  vae_params = abstract(vae_lib.abstract_params(vcfg))
  # The first chunk takes its own path (4k - 3 frames); later chunks carry the caches.
  later_state = jax.eval_shape(lambda p, s, z: vae.apply({"params": p}, s, z,
                                                         method="decode_chunk")[1],
                               vae_params, state0, chunk)
  # What the sample CLI holds meanwhile (it frees the text encoder before sampling): the VAE's
  # params while the sampler runs; the DiT's params (unless --offload_dit) and the whole video's
  # latents while it decodes.
  during_decode = argument_bytes((sampler_args[2],) if args.offload_dit else
                                 (sampler_args[0], sampler_args[2]))
  jobs = [("sampler", sampler, sampler_args, analytic, argument_bytes(vae_params)),
          ("vae_decode_first_chunk", decoder, (vae_params, abstract(state0), chunk), None,
           during_decode),
          ("vae_decode_chunk", decoder, (vae_params, abstract(later_state), chunk), None,
           during_decode)]
  return _compile_jobs(jobs, mesh, target, only, log, kernel_efficiency)


def ode_pairs_request(argv: Sequence[str] = ()):
  """The ODE-pair builder's settings (`python -m asd_jax.data.ode_pairs`) for its flags `argv`.

  Returns:
    (args, timesteps): the parsed flags (the builder's defaults otherwise) and `ode_timesteps`.
  Raises:
    BadInput: a flag the builder would refuse, or training timesteps off the Euler grid.
  """
  from asd_jax import cli  # pylint: disable=g-import-not-at-top
  from asd_jax.data.ode_pairs import cli as ode_cli, trajectories  # pylint: disable=g-import-not-at-top
  try:
    args = ode_cli.parser().parse_args(["--prompts=plan", "--teacher=plan", "--out=plan", *argv])
  except SystemExit:
    raise BadInput(f"the ODE-pair builder's flags {list(argv)} do not parse; see "
                   f"`python -m asd_jax.data.ode_pairs --help`.") from None
  try:
    training = ode_cli.check_args(args)
    trajectories.check_sizes(args.frames, args.height, args.width, args.batch_size)
    return args, trajectories.ode_timesteps(args.steps, args.shift, training)
  except (cli.UsageError, ValueError) as e:
    raise BadInput(f"the ODE-pair builder refuses these settings (--ode_*): {e}") from None


def plan_ode_pairs(config, target: targets.Target, mesh, ode_argv: Sequence[str] = (),
                   only: Sequence[str] | None = None,
                   log: Callable[[str], None] = lambda _: None,
                   kernel_efficiency: float = bd.DEFAULT_KERNEL_EFFICIENCY) -> list[Entry]:
  """Compiles the ODE-pair builder's teacher solve (48 Euler steps with CFG, one batch).

  The program is the one the builder jits (`trajectories.generate_pairs`), for the config's
  teacher (`config.models.teacher`, computing in the builder's --dtype, params stored as its
  --param_dtype: float32 when not given, the widest a converted release can be) at the builder's
  latent size and --batch_size, with the prompt and negative contexts float32 [B, text_len, D] as
  the prompt dataset returns them. The builder runs on one device; here everything is replicated
  over the mesh, which gives each device the one-device figures.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from asd_jax.data.ode_pairs import trajectories  # pylint: disable=g-import-not-at-top
  from asd_jax.models import wan  # pylint: disable=g-import-not-at-top
  from asd_jax.train.programs import wan_config  # pylint: disable=g-import-not-at-top
  args, ts = ode_pairs_request(ode_argv)
  cfg = wan_config(config.models.teacher, args.dtype, "none").replace(
      param_dtype=args.param_dtype or "float32")
  rep = NamedSharding(mesh, P())
  B, L, shape = args.batch_size, config.data.text_len, (args.frames, args.height, args.width,
                                                        cfg.in_channels)
  abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                 wan.abstract_params(cfg))
  context = jax.ShapeDtypeStruct((B, L, cfg.text_dim), jnp.float32, sharding=rep)
  ints = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=rep)
  fn = jax.jit(functools.partial(
      trajectories.solve_pairs, module=wan.WanModel(cfg), latent_shape=shape,
      grid=tuple(ts.grid), indices=tuple(ts.indices), guidance_scale=float(args.guidance)))
  cfg_batch = 2 * B if args.guidance != 1.0 else B
  tokens = fl.tokens(cfg, *shape[:3])
  analytic = args.steps * fl.forward_flops(cfg, cfg_batch, tokens, tokens, L)
  jobs = [("ode_pairs_solve", fn, (abstract_params, ints(), ints(B), context, context), analytic)]
  return _compile_jobs(jobs, mesh, target, only, log, kernel_efficiency)


# ----------------------------------------------------------------------------------------- report


def _gb(x: float | None) -> str:
  return "-" if x is None else f"{x / GB:.2f}"


def _line(e: Entry) -> str:
  m = e.memory
  verdict = "fits" if e.fits else ("DOES NOT FIT" if e.error is None or
                                   e.error.startswith("out of memory") else "ERROR")
  return (f"{e.name}: {verdict}, total {_gb(m.get('total'))} GB of {_gb(e.hbm)} GB, temp "
          f"{_gb(m.get('temp'))} GB ({e.compile_seconds:.0f} s to compile)")


def table(entries: Sequence[Entry], target: targets.Target) -> str:
  """A fixed-width table of the entries (GB = 1e9 bytes, per device)."""
  head = ("program", "arg GB", "out GB", "alias GB", "temp GB", "total GB", "other GB", "headroom",
          "verdict",
          "analytic TF", "XLA TF/dev", "XLA s", "XLA %peak")
  rows = []
  for e in entries:
    m = e.memory
    verdict = ("fits" if e.fits else "DOES NOT FIT" if e.error is None or
               e.error.startswith("out of memory") else "ERROR")
    rows.append((e.name, _gb(m.get("argument")), _gb(m.get("output")), _gb(m.get("alias")),
                 _gb(m.get("temp")), _gb(m.get("total")), _gb(e.resident) if e.resident else "-",
                 _gb(e.headroom), verdict,
                 "-" if e.analytic_flops is None else f"{e.analytic_flops / 1e12:.1f}",
                 "-" if e.xla_flops is None else f"{e.xla_flops / 1e12:.1f}",
                 "-" if e.xla_seconds is None else f"{e.xla_seconds:.3g}",
                 "-" if e.xla_share_of_peak is None else f"{100 * e.xla_share_of_peak:.0f}%"))
  widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
  fmt = "  ".join(f"{{:<{w}}}" if i in (0, 8) else f"{{:>{w}}}" for i, w in enumerate(widths))
  lines = [f"target {target.name}: {target.num_devices} x {target.device_kind}, "
           f"{target.hbm_bytes_per_device / GB:.2f} GB per device", fmt.format(*head)]
  lines += [fmt.format(*r) for r in rows]
  lines += [f"  {e.name}: {e.error}" for e in entries if e.error]
  done = [e for e in entries if e.breakdown]
  if done:
    lines.append("where the time would go, per device (a roofline model, not a measurement):")
    lines += [l for e in done for l in bd.lines(e.name, e.breakdown)]
  return "\n".join(lines)


def report(entries: Sequence[Entry], target: targets.Target, mesh, config_name: str,
           extra: dict | None = None) -> dict[str, Any]:
  """Every figure as a JSON-ready dict."""
  return {
      "target": dataclasses.asdict(target),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "config": config_name,
      **(extra or {}),
      "fits": all(e.fits for e in entries),
      "programs": [e.to_dict() for e in entries],
      "units": "bytes per device; FLOPs: analytic for the whole program (all devices), XLA's per "
               "device; seconds: XLA's estimate",
      "notes": list(NOTES),
  }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
  """Writes JSON atomically (a temporary file in the same directory, then a rename)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1, default=lambda o: np.asarray(o).tolist())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
