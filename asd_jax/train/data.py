"""Batches for the training loop, drawn as a pure function of (seed, sub-step, process).

`make_source(config, ...)` returns `source(substep) -> dict of numpy arrays` holding this process's
rows of the global batch. With `data.prompts` (a dataset of `python -m asd_jax.data.build`) the
contexts are real umT5 embeddings; without it a fixed table of `data.synthetic_prompts` random
"prompt" embeddings stands in (tiny configs, tests). ODE initialisation reads `data.ode_pairs`
(`python -m asd_jax.data.ode_pairs`) or, without it, makes the pairs with the teacher: fresh
ones every step, or (`ode.pool` = N) N examples solved once at start.
With `data.toy` the prompts are the toy world's class embeddings (the null text is the negative)
and pretraining draws fresh samples of the world. No iterator state exists: a resumed run draws
exactly the batches it would have drawn.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from asd_jax.data.prompts import PromptDataset, batch_indices


class SyntheticPrompts:
  """K fixed random embeddings [K, text_len, dim] (zero past a random length) and a negative one."""

  def __init__(self, num: int, text_len: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    self.context = rng.standard_normal((num, text_len, dim)).astype(np.float32)
    lengths = rng.integers(1, text_len + 1, num)
    for i, n in enumerate(lengths):
      self.context[i, n:] = 0.0
    self.negative_context = rng.standard_normal((text_len, dim)).astype(np.float32)

  def __len__(self) -> int:
    return len(self.context)

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    return {"context": self.context[np.asarray(indices)]}


class ToyPrompts:
  """The toy world's classes as prompts: context [K, tokens, dim], the null text as the negative."""

  def __init__(self, world: Any):
    self.world = world
    self.context = np.asarray(world.text, np.float32)
    self.negative_context = np.asarray(world.null_text, np.float32)

  def __len__(self) -> int:
    return len(self.context)

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    return {"context": self.context[np.asarray(indices)]}


def make_source(config: ml_collections.ConfigDict, *, teacher: Any, teacher_params: Any,
                timesteps: tuple[float, ...], latent: tuple[int, int, int, int],
                world: Any = None) -> Callable[[int], dict[str, np.ndarray]]:
  c = config
  per_process = c.batch_size // jax.process_count()
  if per_process * jax.process_count() != c.batch_size:
    raise ValueError(f"batch_size {c.batch_size} is not divisible by the {jax.process_count()} "
                     f"processes.")
  if world is not None:
    prompts = ToyPrompts(world)
  elif c.data.prompts:
    prompts = PromptDataset(c.data.prompts)
  else:
    prompts = SyntheticPrompts(c.data.synthetic_prompts, c.data.text_len,
                               c.models.teacher.get("text_dim") or 4096, c.seed)

  def indices(n: int, substep: int) -> np.ndarray:
    return batch_indices(n, seed=c.seed, step=substep, process_index=jax.process_index(),
                         process_count=jax.process_count(), per_process_batch=per_process)

  neg = np.asarray(prompts.negative_context, np.float32)

  if c.stage == "pretrain":
    if world is None:
      raise ValueError("stage 'pretrain' trains on the toy world's samples: set data.toy = True.")
    sample = jax.jit(world.sample)

    def data_source(substep: int) -> dict[str, np.ndarray]:
      idx = indices(len(prompts), substep)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), substep),
                               jax.process_index())
      clean, _ = sample(key, jnp.asarray(idx, jnp.int32))
      ctx = prompts.get_batch(idx)["context"]
      return {"clean": np.asarray(clean), "context": ctx,
              "neg_context": np.broadcast_to(neg[None], ctx.shape).copy()}
    return data_source

  if c.stage != "ode_init":
    def distill_source(substep: int) -> dict[str, np.ndarray]:
      batch = prompts.get_batch(indices(len(prompts), substep))
      ctx = np.asarray(batch["context"], np.float32)
      return {"context": ctx, "neg_context": np.broadcast_to(neg[None], ctx.shape).copy()}
    return distill_source

  if c.data.ode_pairs:
    from asd_jax.data.ode_pairs.reader import OdePairDataset  # pylint: disable=g-import-not-at-top
    pairs = OdePairDataset(c.data.ode_pairs).with_context(prompts)
    stored = np.asarray(pairs.pairs.timesteps, np.float64)
    if not np.allclose(stored, timesteps, atol=1e-3):
      raise ValueError(f"{c.data.ode_pairs} holds timesteps {stored.tolist()}, the config trains "
                       f"on {list(timesteps)}.")

    def pair_source(substep: int) -> dict[str, np.ndarray]:
      b = pairs.get_batch(indices(len(pairs), substep))
      return {k: np.asarray(b[k], np.float32) for k in ("noisy", "clean", "context")}
    return pair_source

  from asd_jax.data.ode_pairs import trajectories  # pylint: disable=g-import-not-at-top
  grid = trajectories.ode_timesteps(c.ode.steps, c.shift, c.timesteps)
  make = jax.jit(lambda p, idx, ctx, neg_ctx: trajectories.generate_pairs(
      teacher, p, idx, ctx, neg_ctx, seed=c.seed, latent_shape=latent, timesteps=grid,
      guidance_scale=c.ode.guidance))

  def solve(example: np.ndarray, prompt_idx: np.ndarray) -> dict[str, np.ndarray]:
    ctx = prompts.get_batch(prompt_idx)["context"]
    negs = np.broadcast_to(neg[None], ctx.shape)
    noisy, clean = make(teacher_params, jnp.asarray(example, jnp.int32), jnp.asarray(ctx),
                        jnp.asarray(negs))
    return {"noisy": np.asarray(noisy), "clean": np.asarray(clean), "context": ctx}

  pool = int(c.ode.get("pool", 0))
  if pool < 0:
    raise ValueError(f"ode.pool must be >= 0 (0: fresh pairs every step), got {pool}.")
  if not pool:
    def on_the_fly(substep: int) -> dict[str, np.ndarray]:
      idx = indices(len(prompts), substep)
      first = substep * c.batch_size + jax.process_index() * per_process
      return solve(first + np.arange(len(idx)), idx)
    return on_the_fly

  # A fixed set of `pool` examples (example e reads prompt e mod #prompts), solved once, in
  # batches of the training batch's shape, and drawn from like a built pair dataset. It is a
  # function of (seed, teacher) only, so a resumed run solves the same set.
  cache: dict[str, np.ndarray] = {}

  def pooled(substep: int) -> dict[str, np.ndarray]:
    if not cache:
      parts = []
      for start in range(0, pool, per_process):
        example = (start + np.arange(per_process)) % pool
        parts.append(solve(example, example % len(prompts)))
      cache.update({k: np.concatenate([p[k] for p in parts])[:pool] for k in parts[0]})
    rows = indices(pool, substep)
    return {k: v[rows] for k, v in cache.items()}
  return pooled
