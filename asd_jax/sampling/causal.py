"""The causal chunk sampler (Self Forcing inference with First-Frame Enhancement).

For each chunk of `chunk_frames` latent frames: start from its noise; for each timestep of the
chunk's schedule predict x0 with the KV-cached forward (the chunk attends to the cached chunks before
it and to itself) and re-noise to the next timestep with fresh noise; the last x0 is the chunk's
output; then one more forward on that clean output at t = 0 writes the chunk's K/V into the cache
(the "refill"; skipped after the final chunk, where it would be wasted). The first chunk runs before
a `jax.lax.scan` over the later chunks, so it can take its own (longer) schedule: FFE
(ALGORITHM.md sections 2-3). Schedules are static tuples; the number of chunks never changes what is
compiled.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from asd_jax.diffusion.flow import NUM_TRAIN_TIMESTEPS, x0_from_v
from asd_jax.diffusion.schedule import validate_timesteps
from asd_jax.models.wan import split_layers


def chunk_key(rng: jax.Array, chunk: jax.Array | int, step: int) -> jax.Array:
  """The key of the fresh noise drawn after denoising step `step` of chunk `chunk`."""
  return jax.random.fold_in(jax.random.fold_in(rng, chunk), step)


def validate_generation(noise_shape: Sequence[int], first_chunk_timesteps, later_chunk_timesteps,
                        chunk_frames: int, cache_frames: int | None, sink_frames: int):
  """Checks every argument before anything compiles; returns the schedules as float tuples."""
  first = validate_timesteps(first_chunk_timesteps, "first_chunk_timesteps")
  later = validate_timesteps(later_chunk_timesteps, "later_chunk_timesteps")
  if len(noise_shape) != 5:
    raise ValueError(f"noise must be [B, F, H, W, C], got shape {tuple(noise_shape)}.")
  frames = noise_shape[1]
  if chunk_frames < 1 or frames % chunk_frames:
    raise ValueError(f"{frames} latent frames are not a whole number of {chunk_frames}-frame "
                     f"chunks.")
  capacity = frames if cache_frames is None else cache_frames
  if capacity < chunk_frames + sink_frames:
    raise ValueError(f"a cache of {capacity} frames cannot hold {sink_frames} sink frames plus a "
                     f"{chunk_frames}-frame chunk.")
  if sink_frames < 0 or sink_frames % chunk_frames:
    raise ValueError(f"sink_frames must be a non-negative multiple of {chunk_frames}, got "
                     f"{sink_frames}.")
  return first, later, min(capacity, frames)


def generate(module: Any,
             params: Any,
             context: jax.Array,
             noise: jax.Array,
             *,
             first_chunk_timesteps: Sequence[float],
             later_chunk_timesteps: Sequence[float],
             chunk_frames: int = 3,
             rng: jax.Array,
             cache_frames: int | None = None,
             sink_frames: int = 0,
             on_chunk: Callable[[Any], None] | None = None,
             on_chunk_latents: Callable[[Any, Any], None] | None = None,
             return_steps: bool = False):
  """Causal chunked generation with the KV cache.

  Args:
    module, params: a Wan DiT (`asd_jax.models.wan.WanModel`) and its params, stacked or split
      per layer (`asd_jax.models.wan.split_layers`; faster with `scan_layers=False`).
    context: [B, L, text_dim] text embeddings.
    noise: [B, F, H, W, C] the initial noise of every chunk (F a multiple of chunk_frames).
    first_chunk_timesteps: schedule of the first chunk, decreasing, in (0, 1000] (e.g. all four
      of [1000, 937.5, 833.3, 625]).
    later_chunk_timesteps: schedule of every later chunk (e.g. [1000] for 1*, [1000, 937.5] for 2*).
    chunk_frames: latent frames per chunk.
    rng: key of the re-noising between steps (see `chunk_key`).
    cache_frames: latent frames the KV cache holds (default: the whole video); a video longer than
      that rolls the window, keeping the first `sink_frames`.
    on_chunk: optional host callback called with the chunk index once each chunk is done (e.g. a
      progress bar); runs through `jax.debug.callback`.
    on_chunk_latents: optional host callback called with (chunk index, its clean latents
      [B, chunk_frames, H, W, C]) as soon as each chunk is done, while later chunks are still to
      come (what a live viewer decodes and shows); an exception it raises stops the generation.
    return_steps: also return the x0 predicted at every denoising step (the paper's Fig. 4).

  Returns:
    [B, F, H, W, C] float32 clean latents; with `return_steps`, (latents, first [S1, B, k, H, W, C],
    later [S2, B, F - k, H, W, C]): the x0 of each of the S1 steps of the first chunk (k frames)
    and of each of the S2 steps of the later chunks.
  """
  first, later, capacity = validate_generation(noise.shape, first_chunk_timesteps,
                                               later_chunk_timesteps, chunk_frames, cache_frames,
                                               sink_frames)
  B, F, H, W, C = noise.shape
  n = F // chunk_frames
  if not getattr(getattr(module, "config", None), "scan_layers", True):
    # Unrolled layers read per-layer weights; split here, the stacked weights would be sliced (and
    # copied) again by every forward. Callers that split once outside (wan.split_layers) skip this.
    params = split_layers(params)
  variables = {"params": params}

  def forward(x, t, cache, offset):
    return module.apply(variables, x, jnp.full((B,), t, jnp.float32), cache, offset,
                        method="forward_chunk")

  def denoise(x, schedule, cache, offset, chunk):
    # Each denoising forward sees the chunk's own K/V inside its layers; the cache it would return
    # (the noisy chunk in its slots) is never needed, since the refill writes the clean chunk over
    # it. Dropping it lets the compiler skip that whole-cache write.
    steps = []
    for i, t in enumerate(schedule):
      v, _ = forward(x, t, cache, offset)
      x0 = x0_from_v(x, v, jnp.full((B,), t, jnp.float32))
      steps.append(x0)
      if i + 1 < len(schedule):
        s = schedule[i + 1] / NUM_TRAIN_TIMESTEPS
        eps = jax.random.normal(chunk_key(rng, chunk, i), x.shape, jnp.float32)
        x = (1.0 - s) * x0 + s * eps
    return x0, cache, jnp.stack(steps)

  def refill(x0, cache, offset):
    return forward(x0, 0.0, cache, offset)[1]

  def notify(chunk, x0):
    if on_chunk is not None:
      jax.debug.callback(on_chunk, chunk, ordered=True)
    if on_chunk_latents is not None:
      jax.debug.callback(on_chunk_latents, chunk, x0, ordered=True)

  cache = module.apply(variables, context, height=H, width=W, capacity_frames=capacity,
                       sink_frames=sink_frames, method="init_cache")
  noise_NBkHWC = noise.astype(jnp.float32).reshape(B, n, chunk_frames, H, W, C).swapaxes(0, 1)
  x0_first, cache, steps_first = denoise(noise_NBkHWC[0], first, cache, 0, 0)
  if n == 1:
    notify(0, x0_first)
    if return_steps:
      return x0_first, steps_first, jnp.zeros((len(later), B, 0, H, W, C), jnp.float32)
    return x0_first
  cache = refill(x0_first, cache, 0)
  notify(0, x0_first)

  def body(cache, xs):
    noise_c, c = xs
    offset = c * chunk_frames
    x0, cache, steps = denoise(noise_c, later, cache, offset, c)
    cache = jax.lax.cond(c < n - 1, lambda k: refill(x0, k, offset), lambda k: k, cache)
    notify(c, x0)
    return cache, (x0, steps if return_steps else None)

  _, (x0_later, steps_later) = jax.lax.scan(body, cache, (noise_NBkHWC[1:], jnp.arange(1, n)))
  out = jnp.concatenate([x0_first[None], x0_later], axis=0)
  out = out.swapaxes(0, 1).reshape(B, F, H, W, C)
  if not return_steps:
    return out
  # [n - 1, S2, B, k, H, W, C] -> [S2, B, (n - 1) k, H, W, C]
  steps_later = jnp.moveaxis(steps_later, 0, 2).reshape(len(later), B, F - chunk_frames, H, W, C)
  return out, steps_first, steps_later
