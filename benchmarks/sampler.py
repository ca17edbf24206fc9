"""Causal generation: FPS and first-chunk latency, or (--target) memory and cost on an accelerator.

For each step setting (4 = four steps on every chunk; n* = FFE: four steps on the first chunk, n on
the later ones), times one whole video and, separately, the first chunk alone (the latency until the
first frames exist), with random weights. Seconds are medians over repeats after a warm-up (compile
excluded). FPS counts pixel frames, 4 * (F - 1) + 1 for F latent frames. When the VAE is available
(`--vae`), the streaming decode of every chunk is timed too and reported both with and without it.

CPU defaults (reduced): the real 1.3B DiT on 9 latent frames of 8x8 (33 frames of 64x64 pixels).
GPU (the paper's setting): `--frames=21 --height=60 --width=104 --dtype=bfloat16` (832x480, 81
frames). Self Forcing's reference on one H100: 17 FPS and 0.69 s latency at 4 steps.

With `--target=NAME` (an accelerator as `asd_jax.targets` names it: v5e-1, v6e-1, h100x1, v5p-8,
...) nothing runs and nothing is timed: for each step setting the sampler of a whole video and of
the first chunk alone, and the streaming VAE decode of a chunk (unless `--vae=none`), are compiled
for the target without it by the planner's `asd_jax.plan.plan_sampler` (the programs
`python -m asd_jax.sample` runs, built by `asd_jax.sample.make_sampler` / `make_decoder`), which
reports per-device memory against the device's, analytic FLOPs and, on TPU, XLA's cost-model FLOPs
and seconds (an estimate, not a measurement). The weights are stored in the compute dtype (as
here); --dtype defaults to bfloat16. Exit status as the planner's: 0 fits, 3 does not, 1 a compile
error, 2 bad input (before any compile).

With `--reference=PATH` (a checkout of Self Forcing, github guandeh17/Self-Forcing), it instead
runs asd_jax's sampler side by side with Self Forcing's own PyTorch chunk loop in this process, on
the same weights (its `CausalWanModel` with its KV cache, driven as its
`CausalInferencePipeline.inference` drives it), checks that both give the same latents and times
both; see `compare_with_reference`.

Usage: python benchmarks/sampler.py [--preset=1.3b] [--layers=N] [--settings=4,2*,1*] [--repeats=3]
       python benchmarks/sampler.py --target=v6e-1 --frames=21 --height=60 --width=104 [--vae=none]
       python benchmarks/sampler.py --reference=/path/to/Self-Forcing --layers=4 --frames=9 \
         --height=16 --width=26 --steps=4
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from asd_jax.diffusion import few_step_schedule  # noqa: E402
from asd_jax.models import vae as vae_lib  # noqa: E402
from asd_jax.models import wan  # noqa: E402
from asd_jax.sampling import generate  # noqa: E402


def schedules(setting: str, training: tuple[float, ...]) -> tuple[tuple, tuple]:
  """'4' -> (4 steps, 4 steps); '2*' -> (all training steps, the first 2)."""
  if setting.endswith("*"):
    return training, training[:int(setting[:-1])]
  sched = training[:int(setting)]
  return sched, sched


def make_decoder(preset: str, dtype: str, batch: int, height: int, width: int, k: int):
  """decode(latents, chunks): streaming VAE decode (random weights) of the first `chunks` chunks."""
  vcfg = vae_lib.VAEConfig.preset(preset, dtype=dtype)
  vae = vae_lib.WanVAE(vcfg)
  vparams = jax.jit(vae_lib.init_params, static_argnums=0)(vcfg, jax.random.key(3))
  step = jax.jit(lambda p, s, z: vae.apply({"params": p}, s, z, method="decode_chunk"))

  def decode(latents, chunks):
    state = vae.init_decode_state(batch, height, width)
    out = None
    for c in range(chunks):
      out, state = step(vparams, state, latents[:, c * k:(c + 1) * k])
    return out

  return decode


def median_time(fn, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Side by side with Self Forcing's PyTorch chunk loop.


def load_reference(path: str):
  """Imports Self Forcing's `causal_model` and `scheduler` modules from a checkout at `path`.

  Only the modules the chunk loop runs are imported. Two stand-ins, both for running on a CPU:
  - the packages `wan`, `wan.modules` and `utils` are entered as bare namespaces (`sys.modules`), so
    their `__init__` files, which import the T5/CLIP/VAE stacks and their extra dependencies, do not
    run;
  - its attention goes to flash-attn, a CUDA-only package; without it, its fallback casts q/k/v to
    bfloat16 (and then fails in the float32 output projection). Both `attention` in its causal model
    and `flash_attention` in its cross-attention are replaced by PyTorch's
    scaled_dot_product_attention in the inputs' dtype ([B, L, N, D] in and out, no mask, as the
    reference calls them: it slices the cache to the filled part itself, and its text keys have no
    padding mask).
  """
  import torch
  root = Path(path).resolve()
  if not (root / "wan" / "modules" / "causal_model.py").exists():
    raise SystemExit(f"--reference={path}: no wan/modules/causal_model.py there; pass the root of "
                     "a Self Forcing checkout (github guandeh17/Self-Forcing).")
  sys.path.insert(0, str(root))
  for name, sub in (("wan", "wan"), ("wan.modules", "wan/modules"), ("utils", "utils")):
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(root / sub)]
    sys.modules[name] = pkg
  causal_model = importlib.import_module("wan.modules.causal_model")
  wan_model = importlib.import_module("wan.modules.model")
  scheduler = importlib.import_module("utils.scheduler")

  def sdpa(q, k, v, *args, **kwargs):
    del args, kwargs  # k_lens / dtype: unused (no padding in these calls; float32 kept)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)

  causal_model.attention = sdpa
  wan_model.flash_attention = sdpa
  return causal_model, scheduler


class ReferenceLoop:
  """Self Forcing's causal inference loop (`CausalInferencePipeline.inference`) on its own model.

  Kept as the pipeline keeps it: the KV cache (a 32,760-token buffer a layer, as the pipeline
  makes it when `local_attn_size == -1`) and the cross-attention cache are allocated once and reset
  on each call; per chunk, each step calls the model with the cache at `current_start`, converts
  the flow to x0 in float64 (its `WanDiffusionWrapper._convert_flow_pred_to_x0`) and re-noises
  with its scheduler's `add_noise`; then the clean chunk is run once more at t = context_noise = 0
  to refill the cache (after every chunk, the last included). Only the re-noising noise is given
  from outside (`renoise`), so that both samplers draw the same numbers.
  """

  def __init__(self, model, scheduler_mod, steps: int, batch: int, chunk_frames: int,
               tokens_per_frame: int, dtype):
    import torch
    self.torch = torch
    self.model = model
    model.num_frame_per_block = chunk_frames
    self.scheduler = scheduler_mod.FlowMatchScheduler(shift=5.0, sigma_min=0.0,
                                                      extra_one_step=True)
    self.scheduler.set_timesteps(1000, training=True)
    # warp_denoising_step: [1000, 750, 500, 250] -> the scheduler's shifted timesteps
    base = torch.tensor([1000 - 1000 * i // steps for i in range(steps)], dtype=torch.long)
    table = torch.cat((self.scheduler.timesteps.cpu(), torch.tensor([0], dtype=torch.float32)))
    self.timesteps = table[1000 - base]
    self.k = chunk_frames
    self.frame_seq_length = tokens_per_frame
    n, d = model.num_heads, model.dim // model.num_heads
    size = 32760 if model.local_attn_size == -1 else model.local_attn_size * tokens_per_frame
    self.kv_cache = [{"k": torch.zeros([batch, size, n, d], dtype=dtype),
                      "v": torch.zeros([batch, size, n, d], dtype=dtype),
                      "global_end_index": torch.tensor([0], dtype=torch.long),
                      "local_end_index": torch.tensor([0], dtype=torch.long)}
                     for _ in range(model.num_layers)]
    self.crossattn_cache = [{"k": torch.zeros([batch, 512, n, d], dtype=dtype),
                             "v": torch.zeros([batch, 512, n, d], dtype=dtype), "is_init": False}
                            for _ in range(model.num_layers)]

  def _x0(self, flow, xt, timestep):
    torch = self.torch
    dtype = flow.dtype
    flow, xt = flow.double(), xt.double()
    sigmas, timesteps = self.scheduler.sigmas.double(), self.scheduler.timesteps.double()
    tid = torch.argmin((timesteps.unsqueeze(0) - timestep.unsqueeze(1)).abs(), dim=1)
    return (xt - sigmas[tid].reshape(-1, 1, 1, 1) * flow).to(dtype)

  def _generator(self, x_BFCHW, timestep, context, current_start):
    flow = self.model(x_BFCHW.permute(0, 2, 1, 3, 4), t=timestep, context=context, seq_len=32760,
                      kv_cache=self.kv_cache, crossattn_cache=self.crossattn_cache,
                      current_start=current_start).permute(0, 2, 1, 3, 4)
    x0 = self._x0(flow.flatten(0, 1), x_BFCHW.flatten(0, 1), timestep.flatten(0, 1))
    return x0.unflatten(0, flow.shape[:2])

  def __call__(self, noise_BFCHW, context, renoise):
    """noise [B, F, C, H, W]; renoise[chunk][step] [B, k, C, H, W] -> latents [B, F, C, H, W]."""
    torch = self.torch
    for cache in self.crossattn_cache:
      cache["is_init"] = False
    for cache in self.kv_cache:
      cache["global_end_index"] = torch.tensor([0], dtype=torch.long)
      cache["local_end_index"] = torch.tensor([0], dtype=torch.long)
    B, F = noise_BFCHW.shape[:2]
    output = torch.zeros_like(noise_BFCHW)
    start = 0
    with torch.no_grad():
      for c in range(F // self.k):
        x = noise_BFCHW[:, start:start + self.k]
        for i, t in enumerate(self.timesteps):
          timestep = torch.ones([B, self.k], dtype=torch.int64) * t
          x0 = self._generator(x, timestep, context, start * self.frame_seq_length)
          if i < len(self.timesteps) - 1:
            nxt = self.timesteps[i + 1] * torch.ones([B * self.k], dtype=torch.long)
            x = self.scheduler.add_noise(x0.flatten(0, 1), renoise[c][i].flatten(0, 1),
                                         nxt).unflatten(0, x0.shape[:2])
        output[:, start:start + self.k] = x0
        self._generator(x0, torch.ones_like(timestep) * 0, context, start * self.frame_seq_length)
        start += self.k
    return output


def compare_with_reference(args) -> dict:
  """asd_jax's sampler against Self Forcing's loop: same weights, noise, re-noising; times both."""
  import numpy as np
  import torch
  from asd_jax.convert.wan import state_dict_to_params
  from asd_jax.sampling.causal import chunk_key

  causal_model, scheduler_mod = load_reference(args.reference)
  torch.set_num_threads(args.torch_threads)
  dtype = args.dtype or "float32"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  preset = wan.WanConfig.preset(args.preset)
  layers = args.layers or preset.num_layers
  torch.manual_seed(0)
  ref = causal_model.CausalWanModel(
      patch_size=preset.patch_size, text_len=preset.text_len, in_dim=preset.in_channels,
      dim=preset.dim, ffn_dim=preset.ffn_dim, freq_dim=preset.freq_dim, text_dim=preset.text_dim,
      out_dim=preset.out_channels, num_heads=preset.num_heads, num_layers=layers,
      cross_attn_norm=preset.cross_attn_norm, eps=preset.eps).eval()
  with torch.no_grad():  # its init zeroes the head (v = 0) and every bias: make them non-trivial
    for name, p in ref.named_parameters():
      if name.startswith("head.head.weight"):
        p.normal_(std=0.02)
      elif name.endswith("bias"):
        p.normal_(std=0.02)
  _, params = state_dict_to_params({k: v.detach().numpy() for k, v in ref.state_dict().items()},
                                   num_heads=preset.num_heads, fmt="original")
  if tdtype != torch.float32:
    ref = ref.to(tdtype)
  cfg = wan.WanConfig.preset(args.preset, num_layers=layers, dtype=dtype,
                             scan_layers=args.scan_layers)
  module = wan.WanModel(cfg)
  params = jax.device_put(params)
  if dtype != "float32":
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  if not cfg.scan_layers:  # per-layer weights, as `asd_jax.sample` hands them to the sampler
    params = wan.split_layers(params)

  B, F, Hl, Wl, k = 1, args.frames, args.height, args.width, args.chunk_frames
  n = F // k
  pt, ph, pw = cfg.patch_size
  tokens_per_frame = (Hl // ph) * (Wl // pw)
  loop = ReferenceLoop(ref, scheduler_mod, args.steps, B, k, tokens_per_frame, tdtype)
  schedule = tuple(float(t) for t in loop.timesteps)
  ours = few_step_schedule(args.steps)
  if not np.allclose(schedule, ours, rtol=0, atol=1e-3):
    raise SystemExit(f"the reference's timesteps {schedule} differ from asd_jax's {ours}.")

  k1, k2 = jax.random.split(jax.random.key(1))
  noise = jax.random.normal(k1, (B, F, Hl, Wl, cfg.in_channels))
  ctx = jax.random.normal(k2, (B, args.text_len, cfg.text_dim))
  rng = jax.random.key(2)
  # The re-noising noise asd_jax draws (see asd_jax.sampling.causal.generate), handed to the
  # reference as its torch.randn_like would have drawn it.
  renoise = [[torch.from_numpy(np.asarray(jax.random.normal(
      chunk_key(rng, c, i), (B, k, Hl, Wl, cfg.in_channels))).transpose(0, 1, 4, 2, 3).copy())
      .to(tdtype) for i in range(args.steps - 1)] for c in range(n)]
  noise_t = torch.from_numpy(np.asarray(noise).transpose(0, 1, 4, 2, 3).copy()).to(tdtype)
  ctx_t = torch.from_numpy(np.array(ctx)).to(tdtype)

  gen = jax.jit(lambda p, c, z: generate(
      module, p, c, z, first_chunk_timesteps=ours, later_chunk_timesteps=ours, chunk_frames=k,
      rng=rng))
  t0 = time.perf_counter()
  compiled = gen.lower(params, ctx, noise).compile()
  compile_s = time.perf_counter() - t0

  def run_jax():
    return jax.block_until_ready(compiled(params, ctx, noise))

  def run_ref():
    return loop(noise_t, ctx_t, renoise)

  ours_out = np.asarray(run_jax())  # the warm-up calls are also the parity check
  ref_out = run_ref().float().numpy().transpose(0, 1, 3, 4, 2)
  for _ in range(args.warmup - 1):
    run_jax()
    run_ref()
  err = np.abs(ours_out - ref_out)
  # float32 on both sides: about 1e-6 relative a matmul, through (steps + 1) forwards a chunk.
  tol = 1e-3 * float(np.abs(ref_out).max()) if dtype == "float32" else 5e-2 * float(
      np.abs(ref_out).max())
  jax_times, ref_times = [], []
  for _ in range(args.repeats):  # alternated, so load from other processes hits both alike
    t0 = time.perf_counter()
    run_jax()
    jax_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_ref()
    ref_times.append(time.perf_counter() - t0)
  jax_s, ref_s = statistics.median(jax_times), statistics.median(ref_times)
  return {
      "benchmark": "sampler_vs_reference",
      "device": {"jax": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                 "cpu_count": os.cpu_count(), "machine": platform.machine()},
      "config": {"preset": args.preset, "layers": layers, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
                 "heads": cfg.num_heads, "dtype": dtype, "batch": B, "latent_frames": F,
                 "latent_hw": [Hl, Wl], "chunk_frames": k, "chunks": n, "steps": args.steps,
                 "timesteps": list(ours), "text_len": args.text_len,
                 "scan_layers": cfg.scan_layers, "torch_threads": torch.get_num_threads(),
                 "torch_version": torch.__version__, "jax_version": jax.__version__},
      "forwards": {"asd_jax": n * args.steps + n - 1, "reference": n * args.steps + n,
                   "note": "the reference also refills the cache after the last chunk"},
      "compared": "final latents of the whole video, same initial noise and re-noising noise",
      "max_abs_diff": float(err.max()), "max_abs_ref": float(np.abs(ref_out).max()),
      "tolerance": tol, "match": bool(err.max() <= tol),
      "asd_jax_compile_seconds": compile_s,
      "asd_jax_seconds": jax_s, "reference_seconds": ref_s, "ratio": jax_s / ref_s,
      "asd_jax_all_seconds": jax_times, "reference_all_seconds": ref_times,
      "seconds": "median of the timed repeats after the warm-up; JAX compile excluded (reported "
                 "apart), the reference runs eagerly (nothing to compile)",
  }


# ----------------------------------------------------------------------------------------------
# Compiled for an accelerator that is not attached.


def sample_flags(setting: str, args) -> list[str]:
  """The sample CLI's flags (`python -m asd_jax.sample`) of one step setting and the video size.

  '4' -> 4 steps on every chunk; '2*' -> FFE: every training step on the first chunk, the first 2
  on later ones (the CLI's default first chunk), as `schedules` above.
  """
  n = setting[:-1] if setting.endswith("*") else setting
  steps = [f"--steps={n}"] if setting.endswith("*") else [f"--steps={n}",
                                                          f"--first_chunk_steps={n}"]
  return steps + ["--training_steps=4", f"--height={args.height * 8}",
                  f"--width={args.width * 8}", f"--dtype={args.dtype}"]


def compile_for_target(args) -> tuple[dict, int]:
  """The sampler (and the VAE decode) compiled for `args.target` by `asd_jax.plan.plan_sampler`."""
  import dataclasses
  import ml_collections
  from asd_jax import plan, sample, targets
  from asd_jax.train import sharding as shd

  def error(message: str) -> tuple[dict, int]:
    print(f"error: {message}", file=sys.stderr)
    return {}, 2

  if args.chunk_frames != sample.CHUNK_FRAMES:
    return error(f"--target compiles the sampler of `python -m asd_jax.sample`, which takes "
                 f"{sample.CHUNK_FRAMES}-frame chunks; give --chunk_frames={sample.CHUNK_FRAMES}.")
  if args.dtype not in ("float32", "bfloat16"):
    return error(f"--dtype must be float32 or bfloat16 (the sample CLI's), not {args.dtype!r}.")
  if args.vae not in ("wan2.1", "none"):
    return error(f"--target compiles the Wan 2.1 VAE's decode (the planner's); give "
                 f"--vae=wan2.1 or --vae=none, not {args.vae!r}.")
  if args.frames % args.chunk_frames:
    return error(f"--frames {args.frames} is not a whole number of {args.chunk_frames}-frame "
                 f"chunks; e.g. --frames=21.")
  settings = args.settings.split(",")
  for setting in settings:  # the sample CLI's own checks, before anything compiles
    if not setting.rstrip("*").isdigit():
      return error(f"--settings: {setting!r} is not n or n* (e.g. 4,2*,1*).")
    for frames in (args.frames, args.chunk_frames):
      try:
        plan.sample_request(sample_flags(setting, args) + [f"--num_frames={4 * (frames - 1) + 1}"])
      except ValueError as e:
        return error(f"{e} (from --frames/--height/--width, latent sizes: pixels are 8x)")
  try:
    target = targets.parse(args.target)
    devices = targets.devices(target)
  except (ValueError, RuntimeError) as e:
    return error(str(e))
  mesh = shd.make_mesh((-1, 1, 1), devices=devices)  # everything replicated: one device's figures
  # The planner reads the student's architecture and the text length from a run config.
  student = dict(preset=args.preset, scan_layers=args.scan_layers)
  if args.layers:
    student["num_layers"] = args.layers
  config = ml_collections.ConfigDict(dict(models=dict(student=student),
                                          data=dict(text_len=args.text_len)))
  log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
  F, k = args.frames, args.chunk_frames
  result = {
      "benchmark": "sampler", "mode": "deviceless", "timed": False,
      "timing": f"none: compiled for {target.name} without the device, nothing ran; the figures "
                f"are the planner's (asd_jax.plan.plan_sampler): XLA's memory analysis and, on "
                f"TPU, its cost model (xla_seconds is an estimate, not a measurement)",
      "target": dataclasses.asdict(target),
      "mesh": {name: int(v) for name, v in mesh.shape.items()},
      "config": {"preset": args.preset, "layers": args.layers or None, "dtype": args.dtype,
                 "param_dtype": args.dtype, "latent_frames": F, "latent_hw": [args.height,
                                                                               args.width],
                 "pixel_hw": [args.height * 8, args.width * 8], "pixel_frames": 4 * (F - 1) + 1,
                 "chunk_frames": k, "batch": 1, "text_len": args.text_len,
                 "scan_layers": args.scan_layers, "vae": args.vae},
      "settings": {},
  }
  entries = []
  for i, setting in enumerate(settings):
    flags_ = sample_flags(setting, args)
    _, req = plan.sample_request(flags_ + [f"--num_frames={4 * (F - 1) + 1}"])
    row = {"first_chunk_steps": len(req.first), "later_chunk_steps": len(req.later),
           "dit_forwards": len(req.first) + (F // k - 1) * len(req.later) + (F // k - 1),
           "sample_flags": flags_}
    # The whole video, with the decode of a chunk once (it does not depend on the setting).
    only = None if i == 0 and args.vae != "none" else ("sampler",)
    video = plan.plan_sampler(config, target, mesh, flags_ + [f"--num_frames={4 * (F - 1) + 1}"],
                              param_dtype=args.dtype, only=only, log=log)
    video[0].name = f"sampler {setting}"
    entries.append(video[0])
    row["video"] = row["first_chunk"] = video[0].to_dict()
    if F > k:  # the first chunk alone: what the first frames wait for
      first = plan.plan_sampler(config, target, mesh,
                                flags_ + [f"--num_frames={4 * (k - 1) + 1}"],
                                param_dtype=args.dtype, only=("sampler",), log=log)[0]
      first.name = f"sampler {setting} first chunk"
      entries.append(first)
      row["first_chunk"] = first.to_dict()
    for e in video[1:]:
      result.setdefault("vae_decode", {})[e.name] = e.to_dict()
      entries.append(e)
    result["settings"][setting] = row
  log(plan.table(entries, target))
  result["fits"] = all(e.fits for e in entries)
  result["units"] = ("bytes per device; FLOPs: analytic for the whole program, XLA's per device; "
                     "seconds: XLA's estimate")
  result["notes"] = list(plan.NOTES)
  if any(e.error and not e.error.startswith("out of memory") for e in entries):
    return result, 1
  return result, 0 if result["fits"] else 3


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="1.3b")
  ap.add_argument("--frames", type=int, default=9, help="latent frames")
  ap.add_argument("--height", type=int, default=8, help="latent height")
  ap.add_argument("--width", type=int, default=8, help="latent width")
  ap.add_argument("--chunk_frames", type=int, default=3)
  ap.add_argument("--settings", default="4,2*,1*")
  ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU)")
  ap.add_argument("--text_len", type=int, default=512)
  ap.add_argument("--vae", default="wan2.1", help="VAE preset for the streaming decode, or none")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--layers", type=int, default=0, help="blocks (default: the preset's)")
  ap.add_argument("--scan_layers", action="store_true",
                  help="run the blocks under a scan (default: unrolled)")
  ap.add_argument("--reference", default=None,
                  help="path of a Self Forcing checkout: compare with its PyTorch chunk loop")
  ap.add_argument("--steps", type=int, default=4, help="with --reference: steps on every chunk")
  ap.add_argument("--torch_threads", type=int, default=os.cpu_count())
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--target", default=None,
                  help="compile for this accelerator without it (v5e-1, v6e-1, h100x1, ...): "
                       "memory and XLA's cost model instead of timing")
  args = ap.parse_args()

  if args.target:
    if args.reference:
      print("error: --target and --reference are separate modes; give one of them.",
            file=sys.stderr)
      return 2
    from asd_jax import targets
    targets.quiet_cuda_plugin()  # before jax looks for its plugins: GPU targets need it
    args.dtype = args.dtype or "bfloat16"
    result, code = compile_for_target(args)
    if result:
      _emit(result, args.out)
    return code

  if args.reference:
    _emit(compare_with_reference(args), args.out)
    return 0

  on_gpu = jax.default_backend() == "gpu"
  dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
  overrides = {"num_layers": args.layers} if args.layers else {}
  cfg = wan.WanConfig.preset(args.preset, dtype=dtype, scan_layers=args.scan_layers, **overrides)
  module = wan.WanModel(cfg)
  params = jax.jit(wan.init_params, static_argnums=0)(cfg, jax.random.key(0))
  if dtype != "float32":  # inference: keep the weights in the compute dtype
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  if not cfg.scan_layers:
    params = wan.split_layers(params)
  B, F, Hl, Wl, k = 1, args.frames, args.height, args.width, args.chunk_frames
  k1, k2 = jax.random.split(jax.random.key(1))
  noise = jax.random.normal(k1, (B, F, Hl, Wl, cfg.in_channels))
  ctx = jax.random.normal(k2, (B, args.text_len, cfg.text_dim))
  training = few_step_schedule(4)
  pixel_frames = 4 * (F - 1) + 1
  first_chunk_pixels = 4 * (k - 1) + 1

  result = {
      "benchmark": "sampler",
      "device": {"jax": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                 "cpu_count": os.cpu_count(), "machine": platform.machine()},
      "config": {"preset": args.preset, "dtype": dtype, "latent_frames": F,
                 "latent_hw": [Hl, Wl], "pixel_hw": [Hl * 8, Wl * 8],
                 "pixel_frames": pixel_frames, "chunk_frames": k, "batch": B,
                 "training_timesteps": training},
      "includes": "DiT denoising + refills (text K/V computed once per video, included); the "
                  "*_with_vae figures add the streaming VAE decode of every chunk, run after "
                  "the chunk's latents (no overlap)",
      "settings": {},
  }
  decode = make_decoder(args.vae, dtype, B, Hl, Wl, k) if args.vae != "none" else None
  if decode is not None:
    result["config"]["vae"] = args.vae
  for setting in args.settings.split(","):
    first, later = schedules(setting, training)
    gen = jax.jit(lambda p, c, z, first=first, later=later: generate(
        module, p, c, z, first_chunk_timesteps=first, later_chunk_timesteps=later,
        chunk_frames=k, rng=jax.random.key(2)))
    video_s = median_time(lambda: gen(params, ctx, noise), args.warmup, args.repeats)
    latency_s = median_time(lambda: gen(params, ctx, noise[:, :k]), args.warmup, args.repeats)
    forwards = len(first) + (F // k - 1) * len(later) + (F // k - 1)
    entry = {}
    if decode is not None:
      latents = gen(params, ctx, noise)
      decode_all = median_time(lambda: decode(latents, F // k), args.warmup, args.repeats)
      decode_first = median_time(lambda: decode(latents, 1), args.warmup, args.repeats)
      entry = {"vae_decode_seconds": decode_all,
               "fps_with_vae": pixel_frames / (video_s + decode_all),
               "first_chunk_latency_with_vae_seconds": latency_s + decode_first}
    result["settings"][setting] = {
        "first_chunk_steps": len(first), "later_chunk_steps": len(later),
        "dit_forwards": forwards, "video_seconds": video_s, "fps": pixel_frames / video_s,
        "first_chunk_latency_seconds": latency_s,
        "first_chunk_pixel_frames": first_chunk_pixels, **entry,
    }
    print(json.dumps({setting: result["settings"][setting]}), file=sys.stderr)
  _emit(result, args.out)
  return 0


def _emit(result: dict, out: str | None) -> None:
  """Prints the JSON and, with --out, writes it atomically (a temporary sibling, then a rename)."""
  print(json.dumps(result, indent=1))
  if out:
    from asd_jax.plan import write_json
    write_json(out, result)


if __name__ == "__main__":
  sys.exit(main())
