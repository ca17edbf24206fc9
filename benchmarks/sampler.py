"""Speed of causal generation: frames per second and first-chunk latency of `asd_jax.sampling.generate`.

For each step setting (4 = four steps on every chunk; n* = FFE: four steps on the first chunk, n on
the later ones), times one whole video and, separately, the first chunk alone (the latency until the
first frames exist), with random weights. Seconds are medians over repeats after a warm-up (compile
excluded). FPS counts pixel frames, 4 * (F - 1) + 1 for F latent frames. When the VAE is available
(`--vae`), the streaming decode of every chunk is timed too and reported both with and without it.

CPU defaults (reduced): the real 1.3B DiT on 9 latent frames of 8x8 (33 frames of 64x64 pixels).
GPU (the paper's setting): `--frames=21 --height=60 --width=104 --dtype=bfloat16` (832x480, 81
frames). Self Forcing's reference on one H100: 17 FPS and 0.69 s latency at 4 steps.

Usage: python benchmarks/sampler.py [--preset=1.3b] [--settings=4,2*,1*] [--repeats=3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
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


def main() -> None:
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
  args = ap.parse_args()

  on_gpu = jax.default_backend() == "gpu"
  dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
  cfg = wan.WanConfig.preset(args.preset, dtype=dtype, scan_layers=False)
  module = wan.WanModel(cfg)
  params = jax.jit(wan.init_params, static_argnums=0)(cfg, jax.random.key(0))
  if dtype != "float32":  # inference: keep the weights in the compute dtype
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
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
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
