"""The Self Forcing training rollout as a pure function (ALGORITHM.md section 4).

One exit index e in {0..N-1} is shared by every chunk: each chunk runs e denoising steps without
gradient (re-noising after each), then one forward WITH gradient at timestep N[e] whose x0 is the
chunk's output (not re-noised), then a refill forward at t = 0 without gradient writes the chunk's
K/V into the cache. The cache never carries gradient. The rollout is therefore an (e + 1)-step
causal generation in which only the exit forward of each chunk is differentiated.

It runs in two passes so that the backward keeps one cache, not one per chunk. The first pass
generates without gradient (every chunk's exit forward included, whose x0 the refill needs) and
keeps each chunk's exit input and the final cache. As the cache holds every frame (no rolling
window), the final cache restricted to the frames before chunk c is exactly the cache chunk c saw.
The second pass re-runs each chunk's exit forward with gradient against that one final cache,
under `jax.checkpoint`, so a chunk's activations live only while its backward runs. At 832x480x81
(1.3B, bfloat16 cache) a single scan kept 7 caches of 6 GB for the backward; this keeps one, for
one more forward per chunk.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from asd_jax.diffusion.flow import NUM_TRAIN_TIMESTEPS, x0_from_v

Array = jax.Array


def rollout(module: Any,
            params: Any,
            context: Array,
            noise: Array,
            *,
            timesteps: Sequence[float],
            exit_index: Array | int,
            rng: Array,
            chunk_frames: int = 3) -> Array:
  """Self Forcing rollout.

  Args:
    module, params: the causal generator (a Wan DiT) and its params (gradient flows into params
      only through the exit forward of each chunk).
    context: [B, L, text_dim].
    noise: [B, F, H, W, C] initial noise of every chunk.
    timesteps: the training schedule (e.g. [1000, 937.5, 833.3, 625]).
    exit_index: int or traced int32 scalar in [0, N - 1]: steps without gradient before the exit.
    rng: key of the re-noising (chunk c, step i: fold_in(fold_in(rng, c), i), as the sampler).
    chunk_frames: latent frames per chunk.

  Returns:
    [B, F, H, W, C] float32: the exit x0 of every chunk.
  """
  ts = tuple(float(t) for t in timesteps)
  B, F, H, W, C = noise.shape
  if F % chunk_frames:
    raise ValueError(f"{F} latent frames are not a whole number of {chunk_frames}-frame chunks.")
  n = F // chunk_frames
  table = jnp.asarray(ts + (0.0,), jnp.float32)  # t_i and, past the end, 0
  exit_index = jnp.asarray(exit_index, jnp.int32)
  frozen = jax.lax.stop_gradient(params)

  def forward(p, x, t, cache, offset):
    return module.apply({"params": p}, x, jnp.full((B,), t, jnp.float32), cache, offset,
                        method="forward_chunk")

  def no_grad_step(i, carry):
    x, cache, c, offset = carry
    t = table[i]
    v, cache = forward(frozen, x, t, cache, offset)
    x0 = x0_from_v(x, v, jnp.full((B,), t))
    s = table[i + 1] / NUM_TRAIN_TIMESTEPS
    eps = jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, c), i), x.shape)
    return (1.0 - s) * x0 + s * eps, cache, c, offset

  def generate_chunk(cache, xs):  # first pass: no gradient anywhere
    noise_c, c = xs
    offset = c * chunk_frames
    x, cache, _, _ = jax.lax.fori_loop(0, exit_index, no_grad_step,
                                       (noise_c, cache, c, offset))
    t = table[exit_index]
    v, _ = forward(frozen, x, t, cache, offset)
    x0 = x0_from_v(x, v, jnp.full((B,), t))
    _, cache = forward(frozen, x0, 0.0, cache, offset)
    return cache, x

  cache = module.apply({"params": frozen}, context, height=H, width=W, capacity_frames=F,
                       method="init_cache")
  noise_NB = noise.astype(jnp.float32).reshape(B, n, chunk_frames, H, W, C).swapaxes(0, 1)
  final, x_exit = jax.lax.scan(generate_chunk, cache, (noise_NB, jnp.arange(n)))
  final, x_exit = jax.lax.stop_gradient((final, x_exit))

  # The exit forward reads the text K/V made with gradient, so the cross-attention key/value and
  # text-embedding weights learn too (their gradient sums over the chunks); the first pass read
  # the frozen copy in the cache, of equal value.
  text_kv = module.apply({"params": params}, None, None, context, mode="context")
  exit_cache = final.replace(cross_k_LBCND=text_kv[0], cross_v_LBCND=text_kv[1])

  @jax.checkpoint
  def exit_forward(x, c):  # second pass: chunk c's exit forward on the frames before it
    t = table[exit_index]
    v, _ = forward(params, x, t, exit_cache, c * chunk_frames)
    return x0_from_v(x, v, jnp.full((B,), t))

  _, x0s = jax.lax.scan(lambda _, xs: (None, exit_forward(*xs)), None, (x_exit, jnp.arange(n)))
  return x0s.swapaxes(0, 1).reshape(B, F, H, W, C)
