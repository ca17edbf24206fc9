"""The demo's generation engine: one model, one generation at a time, frames out per chunk.

`WanEngine` (a converted release, as `python -m asd_jax.sample` reads it) and `ToyEngine` (a toy-world
student, as `python -m asd_jax.train --config=configs/toy.py` exports it) differ only in where the
context comes from and how a chunk of latents becomes pictures; `Engine.generate` is shared:

  the compiled chunk sampler (`asd_jax.sample.make_sampler`, one program per setting and length,
  kept between requests) runs in a thread and hands every chunk's clean latents to the host as soon
  as it is done (`generate(..., on_chunk_latents=...)`); this thread turns them into frames (the
  streaming VAE decode, `asd_jax.sample.decode_chunks`, or the toy's colour rendering) and passes
  them on while the sampler works on the next chunk. A stop request raises in the sampler's next
  chunk callback, which ends the compiled program there.

Noise is `asd_jax.sample.video_noise` of `fold_in(key(seed), 0)`: the same seed gives the same video
as `python -m asd_jax.sample --seed` with the same schedules and cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import sample
from asd_jax.diffusion import ffe_schedules

SETTINGS = ("4", "3", "2", "1", "2*", "1*")
VARIANTS = ("prefix", "spread")
TOY_FPS = 3  # the toy world's videos (asd_jax.toy.ablation.videos) play at 3 frames a second
TOY_SCALE = 8  # pixels per toy latent pixel


class InputError(ValueError):
  """A request the page sent cannot be run; the message says what to change."""


class Stopped(Exception):
  """Raised in the sampler's chunk callback to end a generation at that chunk."""


class _QuietStops(logging.Filter):
  """JAX logs every exception of a host callback with its traceback; a Stop is no failure."""

  def filter(self, record):
    return not (record.exc_info and isinstance(record.exc_info[1], Stopped))


logging.getLogger("jax._src.debugging").addFilter(_QuietStops())


@dataclasses.dataclass(frozen=True)
class Spec:
  """A validated request: what to generate and with which schedules."""
  text: str  # the prompt, or the toy class's label
  cond: Any  # the prompt string, or the toy class index
  setting: str
  variant: str
  seed: int
  frames: int  # video frames
  latent_frames: int
  first: tuple[float, ...]
  later: tuple[float, ...]


@dataclasses.dataclass
class Result:
  frames: list[np.ndarray]  # uint8 batches [n, H, W, 3], one per chunk
  count: int
  stopped: bool
  compile_s: float | None
  first_chunk_s: float | None
  seconds: float

  @property
  def fps(self) -> float:
    return self.count / self.seconds if self.seconds > 0 else 0.0


def schedules(training: Sequence[float], setting: str, variant: str):
  """(first chunk, later chunks) timesteps of a setting: 'n' takes n steps on every chunk, 'n*'
  all training steps on the first chunk (First-Frame Enhancement) and n on the others."""
  if setting not in SETTINGS:
    raise InputError(f"unknown setting {setting!r}; pick one of {', '.join(SETTINGS)}.")
  if variant not in VARIANTS:
    raise InputError(f"unknown FFE variant {variant!r}; pick one of {', '.join(VARIANTS)}.")
  n = int(setting.rstrip("*"))
  if n > len(training):
    raise InputError(f"setting {setting} needs {n} steps; the model was trained on "
                     f"{len(training)}.")
  later = ffe_schedules(training, n, variant)[1]
  first = tuple(training) if setting.endswith("*") else later
  return first, later


class Engine:
  """What both models share: validation, the compiled programs, the streamed generation."""

  kind = ""
  fps = sample.FPS
  chunk_frames = sample.CHUNK_FRAMES

  def __init__(self, dit, dit_params, training: Sequence[float], *, latent_hw, channels: int,
               max_latent_frames: int, cache_frames: int | None, sink_frames: int):
    self.dit, self.dit_params = dit, dit_params
    self.training = tuple(float(t) for t in training)
    self.latent_hw = tuple(latent_hw)
    self.channels = channels
    self.max_latent_frames = max_latent_frames
    self.cache_frames, self.sink_frames = cache_frames, sink_frames
    self._compiled: dict[tuple, Any] = {}
    self._current: _Run | None = None
    self._lock = threading.Lock()  # one generation at a time

  # What the page needs to know.

  def frame_options(self) -> list[int]:
    """Video frame counts the model can make (whole chunks), shortest first."""
    return [self.video_frames(k) for k in range(self.chunk_frames, self.max_latent_frames + 1,
                                                 self.chunk_frames)]

  def video_frames(self, latent_frames: int) -> int:
    return latent_frames

  def latent_frames(self, frames: int) -> int | None:
    return frames

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "fps": self.fps, "settings": list(SETTINGS),
            "variants": list(VARIANTS), "frame_options": self.frame_options(),
            "training_timesteps": list(self.training),
            "cache_frames": self.cache_frames, "sink_frames": self.sink_frames}

  # Requests.

  def condition(self, raw: dict[str, Any]) -> tuple[str, Any]:
    raise NotImplementedError

  def validate(self, raw: dict[str, Any]) -> Spec:
    """Checks a request from the page (a dict of strings or numbers) before any work starts."""
    text, cond = self.condition(raw)
    first, later = schedules(self.training, str(raw.get("setting", "")),
                             str(raw.get("variant", "prefix")))
    try:
      seed = int(raw.get("seed", 0))
    except (TypeError, ValueError):
      raise InputError(f"the seed must be a whole number, got {raw.get('seed')!r}.") from None
    if not 0 <= seed < 2**31:
      raise InputError(f"the seed must be in [0, 2^31), got {seed}.")
    options = self.frame_options()
    try:
      frames = int(raw.get("frames", 0))
    except (TypeError, ValueError):
      frames = -1
    if frames not in options:
      raise InputError(f"frames must be one of {options[0]}, {options[1] if len(options) > 1 else ''}"
                       f" ... {options[-1]} (whole chunks), got {raw.get('frames')!r}.")
    return Spec(text, cond, str(raw["setting"]), str(raw.get("variant", "prefix")), seed, frames,
                self.latent_frames(frames), first, later)

  # Per model.

  def context(self, spec: Spec) -> jax.Array:
    """[1, L, D] text context."""
    raise NotImplementedError

  def render(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Latent chunks [1, k, h, w, C] -> uint8 frame batches [n, H, W, 3], one per chunk."""
    raise NotImplementedError

  def warm_render(self) -> None:
    """Compiles what `render` runs (called once, with the first compile)."""

  def frame_size(self) -> tuple[int, int]:
    raise NotImplementedError

  # The generation.

  def _on_latents(self, chunk, x0) -> None:
    run = self._current
    if run is None or run.stop.is_set():
      raise Stopped("stopped")
    run.chunks.put((int(chunk), np.asarray(x0)))

  def _program(self, spec: Spec, args, on_status: Callable[[dict], None]):
    key = (spec.first, spec.later, spec.latent_frames)
    compiled = self._compiled.get(key)
    if compiled is not None:
      return compiled, None
    on_status({"type": "compiling"})
    t0 = time.perf_counter()
    req = sample.Request([], spec.first, spec.later, spec.latent_frames, self.latent_hw, [])
    sampler = sample.make_sampler(self.dit, req, cache_frames=self._cache(spec),
                                  sink_frames=self.sink_frames,
                                  on_chunk_latents=lambda i, x: self._on_latents(i, x))
    compiled = sampler.lower(*args).compile()
    if not self._compiled:
      self.warm_render()
    self._compiled[key] = compiled
    return compiled, time.perf_counter() - t0

  def _cache(self, spec: Spec) -> int | None:
    if self.cache_frames is None or self.cache_frames >= spec.latent_frames:
      return None
    return self.cache_frames

  def generate(self, spec: Spec, *, on_status: Callable[[dict], None] = lambda m: None,
               on_frames: Callable[[int, np.ndarray], None] = lambda i, f: None,
               stop: threading.Event | None = None) -> Result:
    """Generates `spec`, calling `on_frames(first frame index, uint8 [n, H, W, 3])` per chunk as
    soon as it is decoded; `stop` (set from any thread) ends it at the next chunk."""
    stop = stop or threading.Event()
    with self._lock:
      context = self.context(spec)
      shape = (1, spec.latent_frames) + self.latent_hw + (self.channels,)
      noise, renoise_key = sample.video_noise(jax.random.fold_in(jax.random.key(spec.seed), 0),
                                              shape)
      args = (self.dit_params, context, noise, renoise_key)
      compiled, compile_s = self._program(spec, args, on_status)
      on_status({"type": "started", "first": list(spec.first), "later": list(spec.later),
                 "frames": spec.frames, "compile_s": compile_s})
      run = _Run(stop)
      self._current = run
      t0 = time.perf_counter()
      worker = threading.Thread(target=run.sample, args=(compiled, args), daemon=True)
      worker.start()
      frames, count, first_s = [], 0, None
      try:
        for batch in self.render(run.latents()):
          if first_s is None:
            first_s = time.perf_counter() - t0
          frames.append(batch)
          on_frames(count, batch)
          count += len(batch)
          if stop.is_set():
            break
      finally:
        stop_seen = stop.is_set()
        stop.set()  # a sampler still running ends at its next chunk
        worker.join()
        self._current = None
      seconds = time.perf_counter() - t0
      if run.error is not None and not stop_seen:
        raise run.error
      return Result(frames, count, stop_seen and count < spec.frames, compile_s, first_s, seconds)

  def save_mp4(self, result: Result, path: Path) -> int:
    return sample.write_mp4(path, iter(result.frames), self.frame_size(), fps=self.fps)


class _Run:
  """One generation's hand-over between the sampler thread and the rendering thread."""
  END = object()

  def __init__(self, stop: threading.Event):
    self.stop = stop
    self.chunks: queue.Queue = queue.Queue()
    self.error: BaseException | None = None

  def sample(self, compiled, args) -> None:
    try:
      jax.block_until_ready(compiled(*args))
    except Exception as e:  # pylint: disable=broad-except
      if not self.stop.is_set():
        self.error = e
    finally:
      self.chunks.put(self.END)

  def latents(self) -> Iterator[np.ndarray]:
    while True:
      item = self.chunks.get()
      if item is self.END:
        return
      yield item[1]


class WanEngine(Engine):
  """A converted Wan release: prompt -> umT5 context; chunk -> the streaming VAE decode."""

  kind = "wan"

  def __init__(self, models: sample.Models, training, *, height: int, width: int,
               max_frames: int, cache_frames: int | None, sink_frames: int):
    if height % 16 or width % 16:
      raise ValueError(f"--height and --width must be multiples of 16, got {height}x{width}.")
    max_latent = (max_frames - 1) // 4 + 1
    max_latent -= max_latent % self.chunk_frames
    if max_latent < self.chunk_frames:
      raise ValueError(f"--max_frames {max_frames} is shorter than one chunk "
                       f"({self.video_frames(self.chunk_frames)} frames).")
    super().__init__(models.dit, models.dit_params, training, latent_hw=(height // 8, width // 8),
                     channels=models.dit.config.in_channels, max_latent_frames=max_latent,
                     cache_frames=cache_frames, sink_frames=sink_frames)
    self.models = models
    self.decoder = sample.make_decoder(models.vae)
    self._contexts: dict[str, jax.Array] = {}

  def video_frames(self, latent_frames: int) -> int:
    return 4 * (latent_frames - 1) + 1

  def latent_frames(self, frames: int) -> int:
    return (frames - 1) // 4 + 1

  def describe(self):
    return {**super().describe(), "condition": "prompt"}

  def condition(self, raw):
    prompt = str(raw.get("prompt", "")).strip()
    if not prompt:
      raise InputError("write a prompt first.")
    if len(prompt) > 2000:
      raise InputError(f"the prompt is {len(prompt)} characters long; keep it under 2000.")
    return prompt, prompt

  def context(self, spec):
    if spec.cond not in self._contexts:
      if len(self._contexts) > 64:
        self._contexts.clear()
      self._contexts[spec.cond] = jnp.asarray(self.models.encoder([spec.cond])[0])
    return self._contexts[spec.cond]

  def render(self, chunks):
    return sample.decode_chunks(self.models.vae, self.models.vae_params, chunks, step=self.decoder)

  def warm_render(self):
    z = np.zeros((1, self.chunk_frames) + self.latent_hw + (self.channels,), np.float32)
    for _ in self.render(iter([z, z])):  # the first chunk's program and the later chunks'
      pass

  def frame_size(self):
    return self.latent_hw[0] * 8, self.latent_hw[1] * 8


class ToyEngine(Engine):
  """A toy-world student: class -> its text embedding; latents shown as colour, upscaled."""

  kind = "toy"
  fps = TOY_FPS

  def __init__(self, dit, dit_params, world, training, *, chunk_frames: int,
               max_latent_frames: int, cache_frames: int | None, sink_frames: int):
    cfg = world.cfg
    if dit.config.in_channels != cfg.channels or dit.config.text_dim != cfg.text_dim:
      raise ValueError(f"the student takes {dit.config.in_channels} channels and text_dim "
                       f"{dit.config.text_dim}; the toy world has {cfg.channels} and "
                       f"{cfg.text_dim}: the export and the config do not belong together.")
    self.chunk_frames = chunk_frames
    super().__init__(dit, dit_params, training, latent_hw=(cfg.height, cfg.width),
                     channels=cfg.channels, max_latent_frames=max_latent_frames,
                     cache_frames=cache_frames, sink_frames=sink_frames)
    self.world = world

  def describe(self):
    return {**super().describe(), "condition": "class",
            "classes": [f"class {k}" for k in range(self.world.cfg.num_classes)]}

  def condition(self, raw):
    try:
      k = int(raw.get("class", -1))
    except (TypeError, ValueError):
      k = -1
    if not 0 <= k < self.world.cfg.num_classes:
      raise InputError(f"pick a class in 0..{self.world.cfg.num_classes - 1}, got "
                       f"{raw.get('class')!r}.")
    return f"class {k}", k

  def context(self, spec):
    return jnp.asarray(self.world.text[spec.cond][None])

  def render(self, chunks):
    from asd_jax.toy.ablation import render_frames  # pylint: disable=g-import-not-at-top
    for x in chunks:
      yield render_frames(self.world, x[:1], scale=TOY_SCALE)

  def frame_size(self):
    return self.latent_hw[0] * TOY_SCALE, self.latent_hw[1] * TOY_SCALE


def load_toy(workdir: str | Path, run: str = "asd", *, max_latent_frames: int | None = None,
             cache_frames: int | None = None, sink_frames: int = 0) -> ToyEngine:
  """The toy engine of a pipeline workdir (`python -m asd_jax.train --config=configs/toy.py
  --workdir=DIR`): the student `DIR/RUN/export`, the world and schedule of `DIR/results.json`'s
  config (the toy config's defaults before the pipeline has written it)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from asd_jax import pretrained  # pylint: disable=g-import-not-at-top
  from asd_jax.diffusion import warp_timesteps  # pylint: disable=g-import-not-at-top
  from asd_jax.models.wan import split_layers  # pylint: disable=g-import-not-at-top
  from asd_jax.toy.config import get_config  # pylint: disable=g-import-not-at-top
  from asd_jax.train.loop import toy_world  # pylint: disable=g-import-not-at-top
  workdir = Path(workdir)
  export = workdir / run / "export"
  if not (export / "config.json").is_file():
    found = sorted(p.parent.name for p in workdir.glob("*/export/config.json"))
    raise FileNotFoundError(f"no toy export {export}; run `python -m asd_jax.train "
                            f"--config=configs/toy.py --workdir={workdir}` first"
                            + (f" or pick --toy_run from {found}." if found else "."))
  results = workdir / "results.json"
  if results.is_file():
    c = ml_collections.ConfigDict(json.loads(results.read_text())["config"])
  else:
    c = get_config()
  world = toy_world(c)
  dit, params = pretrained.load(export, scan_layers=False)
  params = split_layers(params)  # once here, not in every compiled program's trace
  frames = world.cfg.frames
  max_latent = max_latent_frames or 4 * frames
  return ToyEngine(dit, params, world, warp_timesteps(c.timesteps, c.shift),
                   chunk_frames=int(c.chunk_frames), max_latent_frames=max_latent,
                   cache_frames=frames if cache_frames is None else cache_frames,
                   sink_frames=sink_frames)

