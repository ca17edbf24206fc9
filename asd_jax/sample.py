"""python -m asd_jax.sample: text in, mp4 out, with the causal chunk sampler and streaming decode.

  python -m asd_jax.sample --model_dir=DIR [--checkpoint=DIR] --prompt="..." [--prompts_file=F]
      [--steps=N] [--first_chunk_steps=M] [--num_frames=81] [--seed=0] [--output=out.mp4]

`--model_dir` holds the converted parts `dit/`, `vae/`, `umt5/`, `tokenizer/` (what
`python -m asd_jax.convert release` writes); `--checkpoint` replaces the generator (e.g. a distilled
export); `--vae`, `--text_encoder`, `--tokenizer` replace single parts. Later chunks take `--steps`
steps, the first chunk `--first_chunk_steps` (First-Frame Enhancement: 4 and 1 give "1*"), picked
from the `--training_steps` warped schedule by prefix or spread; `--first_chunk_timesteps` and
`--later_chunk_timesteps` give explicit lists instead. Every function here can be called from Python.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import cli
from asd_jax.diffusion import ffe_schedules, few_step_schedule, validate_timesteps
from asd_jax.io import atomic
from asd_jax.sampling import generate, validate_generation

FPS = 16
CHUNK_FRAMES = 3


@dataclass
class Request:
  """A validated sampling request (everything checked before a model is loaded)."""
  prompts: list[str]
  first: tuple[float, ...]
  later: tuple[float, ...]
  latent_frames: int
  latent_hw: tuple[int, int]
  outputs: list[Path]


def _floats(text: str | None) -> tuple[float, ...] | None:
  if text is None:
    return None
  try:
    return tuple(float(t) for t in text.replace(" ", "").split(",") if t)
  except ValueError as e:
    raise ValueError(f"expected comma-separated timesteps, got {text!r}.") from e


def plan(args: argparse.Namespace) -> Request:
  """Checks the arguments and works out schedules, sizes and output paths (no model loaded)."""
  prompts = []
  if args.prompt:
    prompts.append(args.prompt)
  if args.prompts_file:
    path = Path(args.prompts_file)
    if not path.is_file():
      raise FileNotFoundError(f"--prompts_file {path} does not exist.")
    prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
  if not prompts:
    raise cli.UsageError("give a --prompt or a non-empty --prompts_file.")
  if args.num_frames < 1:
    raise cli.UsageError(f"--num_frames must be a positive 4k + 1 count of video frames, got "
                         f"{args.num_frames}; e.g. 81, 45, 33, 9.")
  for flag in ("height", "width"):
    if getattr(args, flag) < 16:
      raise cli.UsageError(f"--{flag} must be a positive multiple of 16 pixels, got "
                           f"{getattr(args, flag)}.")
  for flag in ("steps", "training_steps", "first_chunk_steps"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise cli.UsageError(f"--{flag} must be >= 1, got {value}.")
  if args.cache_frames is not None and args.cache_frames < 1:
    raise cli.UsageError(f"--cache_frames must be >= 1 latent frames, got {args.cache_frames}.")
  if args.sink_frames < 0:
    raise cli.UsageError(f"--sink_frames must be >= 0, got {args.sink_frames}.")
  if args.seed < 0:
    raise cli.UsageError(f"--seed must be >= 0, got {args.seed}.")
  if (args.num_frames - 1) % 4:
    raise ValueError(f"--num_frames must be 4k + 1 (the VAE's temporal stride), got "
                     f"{args.num_frames}; e.g. 81, 45, 33, 9.")
  latent_frames = (args.num_frames - 1) // 4 + 1
  if latent_frames % CHUNK_FRAMES:
    ok = [4 * (CHUNK_FRAMES * n - 1) + 1 for n in range(1, 8)]
    raise ValueError(f"--num_frames {args.num_frames} gives {latent_frames} latent frames, not a "
                     f"whole number of {CHUNK_FRAMES}-frame chunks; use one of {ok}.")
  if args.height % 16 or args.width % 16:
    raise ValueError(f"--height and --width must be multiples of 16, got {args.height}x"
                     f"{args.width}.")
  training = few_step_schedule(args.training_steps, args.shift)
  first = _floats(args.first_chunk_timesteps)
  later = _floats(args.later_chunk_timesteps)
  first_steps = args.first_chunk_steps if args.first_chunk_steps else max(args.steps,
                                                                         args.training_steps)
  if first is None:
    first = ffe_schedules(training, first_steps, args.ffe_variant)[1]
  if later is None:
    later = ffe_schedules(training, args.steps, args.ffe_variant)[1]
  first = validate_timesteps(first, "--first_chunk_timesteps")
  later = validate_timesteps(later, "--later_chunk_timesteps")
  latent_hw = (args.height // 8, args.width // 8)
  validate_generation((1, latent_frames) + latent_hw + (1,), first, later, CHUNK_FRAMES,
                      args.cache_frames, args.sink_frames)
  out = Path(args.output)
  if out.suffix.lower() != ".mp4":
    raise cli.UsageError(f"--output must end in .mp4, got {out}.")
  if out.is_dir():
    raise cli.UsageError(f"--output {out} is a directory; give a file name ending in .mp4.")
  atomic.check_writable_dir(out.parent, "--output's folder")
  outputs = ([out] if len(prompts) == 1 else
             [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(len(prompts))])
  return Request(prompts, first, later, latent_frames, latent_hw, outputs)


def resolve_parts(args: argparse.Namespace) -> dict[str, Path]:
  """Paths of dit/vae/umt5/tokenizer from --model_dir and the single-part overrides."""
  root = Path(args.model_dir) if args.model_dir else None
  parts = {"dit": args.checkpoint, "vae": args.vae, "umt5": args.text_encoder,
           "tokenizer": args.tokenizer}
  out, missing = {}, []
  for name, override in parts.items():
    path = Path(override) if override else (root / name if root else None)
    if path is None or not path.exists():
      missing.append(f"{name}: {path if path else '(no --model_dir)'}")
    else:
      out[name] = path
  dit = out.get("dit")
  if dit is not None and not (dit / "config.json").is_file():
    flag = "--checkpoint" if args.checkpoint else "--model_dir"
    if (dit / "checkpoints").is_dir() or (dit / "export").is_dir():
      hint = (f"{dit} is a training workdir; give its exported generator: {flag}="
              f"{dit / 'export'}" + ("" if (dit / "export").is_dir() else
                                     " (written when the run finishes)"))
    else:
      hint = (f"{dit} has no config.json: it is not a converted model directory (write one with "
              f"`python -m asd_jax.convert wan` or train one: WORKDIR/export)")
    raise cli.UsageError(f"{flag}: {hint}.")
  if missing:
    raise FileNotFoundError(
        "missing model parts:\n  " + "\n  ".join(missing) + "\nGive --model_dir (written by "
        "`python -m asd_jax.convert release`) or --checkpoint/--vae/--text_encoder/--tokenizer.")
  return out


@dataclass
class Models:
  """The loaded parts: text encoder, DiT and VAE (modules and params)."""
  encoder: Any
  dit: Any
  dit_params: Any
  vae: Any
  vae_params: Any


def load_models(parts: dict[str, Path], dtype: str, param_dtype: str | None = None) -> Models:
  """Loads the parts `resolve_parts` found and checks that they belong together (what `run` and
  `python -m asd_jax.evaluate` sample with). `param_dtype` stores the DiT's and the VAE's params
  in that dtype (default: as converted, float32); bfloat16 halves their memory (what lets the
  1.3B sampler at 832x480x81 fit a 16 GB v5e chip: `python -m asd_jax.plan --sample`)."""
  from asd_jax import pretrained  # pylint: disable=g-import-not-at-top
  from asd_jax.text import TextEncoder  # pylint: disable=g-import-not-at-top
  encoder = TextEncoder.load(parts["umt5"], parts["tokenizer"], dtype=dtype)
  stored = {"param_dtype": param_dtype} if param_dtype else {}
  dit, dit_params = pretrained.load(parts["dit"], dtype=dtype, **stored)
  vae, vae_params = pretrained.load(parts["vae"], dtype=dtype, **stored)
  text_dim = encoder.module.config.d_model
  if text_dim != dit.config.text_dim:
    raise ValueError(f"the text encoder gives {text_dim} channels, the DiT expects "
                     f"text_dim={dit.config.text_dim}: the parts do not belong together.")
  if vae.config.z_dim != dit.config.in_channels:
    raise ValueError(f"the VAE has {vae.config.z_dim} latent channels, the DiT "
                     f"{dit.config.in_channels}: the parts do not belong together.")
  return Models(encoder, dit, dit_params, vae, vae_params)


def video_noise(key: jax.Array, shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """(initial noise float32 `shape`, the re-noising key of `generate`) of one video's key."""
  noise_key, renoise_key = jax.random.split(key)
  return jax.random.normal(noise_key, tuple(shape), jnp.float32), renoise_key


def make_sampler(dit: Any, req: Request, *, cache_frames: int | None = None,
                 sink_frames: int = 0, on_chunk=None, on_chunk_latents=None):
  """The jitted chunk sampler: `sampler(params, context [B, L, D], noise [B, F, h, w, C], rng)`
  -> latents like noise (what `run` calls; `python -m asd_jax.plan --sample` compiles it;
  `on_chunk_latents` streams each chunk out as it is done, for `python -m asd_jax.demo`)."""
  return jax.jit(lambda p, c, z, r: generate(
      dit, p, c, z, first_chunk_timesteps=req.first, later_chunk_timesteps=req.later,
      chunk_frames=CHUNK_FRAMES, rng=r, cache_frames=cache_frames, sink_frames=sink_frames,
      on_chunk=on_chunk, on_chunk_latents=on_chunk_latents))


def make_decoder(vae_module: Any):
  """The jitted streaming decode of one chunk: `step(params, state, latents [B, k, h, w, z])`
  -> (frames [B, 4k (4k - 3 for the first chunk), H, W, 3], the next state)."""
  return jax.jit(lambda p, s, z: vae_module.apply({"params": p}, s, z, method="decode_chunk"))


def decode_stream(vae_module: Any, vae_params: Any, latents: jax.Array,
                  chunk_frames: int = CHUNK_FRAMES, step=None) -> Iterator[np.ndarray]:
  """Streaming decode: yields uint8 frames [n, H, W, 3] chunk by chunk (latents [1, F, h, w, z]);
  `step` reuses a `make_decoder` across videos."""
  F = latents.shape[1]
  return decode_chunks(vae_module, vae_params,
                       (latents[:, s:s + chunk_frames] for s in range(0, F, chunk_frames)),
                       step=step)


def decode_chunks(vae_module: Any, vae_params: Any, chunks: Iterable[jax.Array],
                  step=None) -> Iterator[np.ndarray]:
  """Streaming decode of latent chunks [1, k, h, w, z] as they come (e.g. from the sampler's
  `on_chunk_latents`): yields uint8 frames [n, H, W, 3] per chunk; `step` reuses a
  `make_decoder` (its compiled programs) across videos."""
  step = make_decoder(vae_module) if step is None else step
  state = None
  for chunk in chunks:
    if state is None:
      state = vae_module.init_decode_state(chunk.shape[0], *chunk.shape[2:4])
    frames, state = step(vae_params, state, chunk)
    yield np.asarray(jnp.round((frames[0] + 1.0) * 127.5).astype(jnp.uint8))


class VideoWriteError(OSError):
  """ffmpeg could not write the video (full disk, read-only folder, ...); nothing was replaced."""


def _encode_mp4(tmp: Path, frames: Iterator[np.ndarray], size: tuple[int, int], fps: int) -> int:
  """Runs ffmpeg (libx264) on the frames into `tmp`; returns the count. Raises VideoWriteError."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  height, width = size
  writer = imageio_ffmpeg.write_frames(str(tmp), (width, height), fps=fps, codec="libx264",
                                       pix_fmt_out="yuv420p", macro_block_size=1,
                                       output_params=["-crf", "18", "-f", "mp4"],
                                       ffmpeg_log_level="error")
  with warnings.catch_warnings():  # ffmpeg's fork is followed by exec: JAX's warning is moot
    cli.quiet_known_noise()
    writer.send(None)
  count = 0
  try:
    for batch in frames:
      for frame in batch:
        writer.send(np.ascontiguousarray(frame))
        count += 1
  except IOError as e:  # ffmpeg died: its stdin broke
    raise VideoWriteError(f"ffmpeg stopped while writing {tmp}: "
                          f"{str(e).splitlines()[0]}") from None
  finally:
    writer.close()
  return count


def write_mp4(path: Path, frames: Iterator[np.ndarray], size: tuple[int, int],
              fps: int = FPS) -> int:
  """Writes uint8 frame batches [n, H, W, 3] to an H.264 mp4 as they come; returns the count.

  The video goes to a temporary file beside `path` and replaces it only once ffmpeg has exited
  and the file holds a whole mp4 (its size and the count checked); on any failure the temporary
  is removed, an existing `path` is kept and VideoWriteError (an OSError) says why.
  """
  path = Path(path)
  with atomic.atomic_file(path, suffix=".mp4") as tmp:
    count = _encode_mp4(tmp, frames, size, fps)
    written = tmp.stat().st_size if tmp.exists() else 0
    if count == 0:
      raise VideoWriteError(f"no frames to write to {path}.")
    # A whole mp4 holds the 'moov' index, written last: a disk that filled up, or an ffmpeg that
    # failed, leaves an empty or truncated file whose exit status imageio does not report.
    if written < 1024 or not _has_moov(tmp):
      free = atomic.fmt_bytes(atomic.free_bytes(path.parent))
      raise VideoWriteError(f"ffmpeg wrote an incomplete video ({written} bytes) for {path} "
                            f"({free} free on its disk); {path} was left as it was.")
  return count


def _has_moov(path: Path) -> bool:
  """Whether an mp4's top-level boxes include 'moov' (ffmpeg writes it once every frame is in)."""
  with open(path, "rb") as f:
    size = path.stat().st_size
    pos = 0
    while pos + 8 <= size:
      f.seek(pos)
      head = f.read(16)
      box_size, kind = int.from_bytes(head[:4], "big"), head[4:8]
      if kind == b"moov":
        return True
      if box_size == 1 and len(head) >= 16:
        box_size = int.from_bytes(head[8:16], "big")
      if box_size < 8:
        return False
      pos += box_size
  return False


def _progress(total: int, desc: str, quiet: bool):
  if quiet:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="chunk", file=sys.stderr)


def run(args: argparse.Namespace) -> list[Path]:
  """Loads the parts, generates every prompt, writes the mp4s (and latents); returns the paths."""
  req = plan(args)
  parts = resolve_parts(args)
  log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
  log(f"schedules: first chunk {list(req.first)}, later chunks {list(req.later)}")
  models = load_models(parts, args.dtype, args.param_dtype)
  dit, dit_params, vae, vae_params = models.dit, models.dit_params, models.vae, models.vae_params
  context, _ = models.encoder(req.prompts)
  # Every prompt is encoded: the text encoder's params (umT5-XXL, 11 GB in bf16) leave the device
  # before the DiT runs, which is what lets a 16 GB chip sample (`python -m asd_jax.plan --sample`).
  del models
  n_chunks = req.latent_frames // CHUNK_FRAMES
  shape = (1, req.latent_frames) + req.latent_hw + (dit.config.in_channels,)

  bar = None

  def on_chunk(_):
    if bar is not None:
      bar.update(1)

  sampler = make_sampler(dit, req, cache_frames=args.cache_frames, sink_frames=args.sink_frames,
                         on_chunk=on_chunk)
  written, host_params = [], None
  for i, (prompt, out) in enumerate(zip(req.prompts, req.outputs)):
    noise, renoise_key = video_noise(jax.random.fold_in(jax.random.key(args.seed), i), shape)
    bar = _progress(n_chunks, f"denoise {i + 1}/{len(req.prompts)}", args.quiet)
    t0 = time.perf_counter()
    if dit_params is None:  # --offload_dit: back from the host for this prompt
      dit_params = jax.device_put(host_params)
    latents = jax.block_until_ready(sampler(dit_params, jnp.asarray(context[i:i + 1]), noise,
                                            renoise_key))
    gen_s = time.perf_counter() - t0
    if args.offload_dit:  # the device copy is freed while the VAE decodes
      host_params, dit_params = jax.device_get(dit_params), None
    if bar is not None:
      bar.close()
    if args.save_latents:
      atomic.save_npy(out.with_suffix(".latents.npy"), latents[0])
    bar = _progress(n_chunks, f"decode {i + 1}/{len(req.prompts)}", args.quiet)

    def frames():
      for batch in decode_stream(vae, vae_params, latents):
        yield batch
        if bar is not None:
          bar.update(1)

    pixel_hw = (req.latent_hw[0] * 8, req.latent_hw[1] * 8)
    count = write_mp4(out, frames(), pixel_hw)
    if bar is not None:
      bar.close()
    log(json.dumps({"prompt": prompt, "output": str(out), "frames": count,
                    "generate_seconds": round(gen_s, 3)}))
    written.append(out)
  return written


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m asd_jax.sample", description=__doc__.split("\n")[0])
  p.add_argument("--model_dir", help="converted parts: dit/, vae/, umt5/, tokenizer/")
  p.add_argument("--checkpoint", help="generator directory (replaces model_dir/dit)")
  p.add_argument("--vae", help="VAE directory (replaces model_dir/vae)")
  p.add_argument("--text_encoder", help="umT5 directory (replaces model_dir/umt5)")
  p.add_argument("--tokenizer", help="tokenizer directory (replaces model_dir/tokenizer)")
  p.add_argument("--prompt", help="one prompt")
  p.add_argument("--prompts_file", help="a text file, one prompt per line")
  p.add_argument("--steps", type=int, default=4, help="denoising steps of later chunks")
  p.add_argument("--first_chunk_steps", type=int, default=None,
                 help="steps of the first chunk (default: all --training_steps, i.e. FFE)")
  p.add_argument("--training_steps", type=int, default=4,
                 help="length of the warped schedule the generator was trained on")
  p.add_argument("--shift", type=float, default=5.0, help="timestep shift of that schedule")
  p.add_argument("--ffe_variant", default="prefix", choices=("prefix", "spread"))
  p.add_argument("--first_chunk_timesteps", help="explicit list, e.g. 1000,937.5,833.33,625")
  p.add_argument("--later_chunk_timesteps", help="explicit list, e.g. 1000")
  p.add_argument("--num_frames", type=int, default=81, help="pixel frames, 4k + 1")
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=832)
  p.add_argument("--cache_frames", type=int, default=None,
                 help="latent frames in the KV cache (default: the whole video)")
  p.add_argument("--sink_frames", type=int, default=0, help="frames kept when the window rolls")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--param_dtype", default=None, choices=("float32", "bfloat16"),
                 help="store the DiT's and VAE's params in this dtype (default: as converted, "
                      "float32; bfloat16 halves their memory)")
  p.add_argument("--offload_dit", action="store_true",
                 help="keep the DiT's params in host memory while the VAE decodes (and move them "
                      "back for the next prompt): a 16 GB chip then holds the decode at 832x480")
  p.add_argument("--output", default="out.mp4")
  p.add_argument("--save_latents", action="store_true", help="also write OUTPUT.latents.npy")
  p.add_argument("--quiet", action="store_true")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: 0 done, 2 bad input (nothing written), 1 a failure while working.

  `--debug` (or ASD_JAX_DEBUG=1) shows the traceback of an expected failure."""

  def _main(args_list: list[str]) -> int:
    run(parser().parse_args(args_list))
    return 0
  return cli.run(_main, argv, usage_errors=(ValueError, FileNotFoundError, NotImplementedError))


if __name__ == "__main__":
  sys.exit(main())
