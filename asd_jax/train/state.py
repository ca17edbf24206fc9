"""The training state: one pytree with every network, its optimizer state, the step and the key."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a distillation run changes (the frozen teacher lives outside).

  step: completed generator updates (one update-ratio cycle each; int32 scalar).
  generator / generator_ema / critic / heads: params (float32 master weights).
  *_opt: optax states. rng: the run's base key (every step folds the step number into it).
  skipped: updates skipped for non-finite values so far (int32 scalar).
  """
  step: Array
  generator: Any
  generator_ema: Any
  critic: Any
  heads: Any
  gen_opt: Any
  critic_opt: Any
  heads_opt: Any
  rng: Array
  skipped: Array


def make_optimizer(lr: float, *, b1: float = 0.0, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01, clip_norm: float = 10.0) -> optax.GradientTransformation:
  """AdamW after clipping by global norm (Self Forcing's DMD settings by default)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def init_state(generator: Any, critic: Any, heads: Any, *, gen_tx, critic_tx, heads_tx,
               rng: Array) -> TrainState:
  """A fresh state; the EMA starts as a copy of the generator."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, generator=generator,
                    generator_ema=jax.tree_util.tree_map(jnp.copy, generator), critic=critic,
                    heads=heads, gen_opt=gen_tx.init(generator), critic_opt=critic_tx.init(critic),
                    heads_opt=heads_tx.init(heads), rng=rng, skipped=zero)


def all_finite(*trees: Any) -> Array:
  leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def apply_if(ok: Array, new: Any, old: Any) -> Any:
  """new where ok else old, leaf by leaf (a skipped update keeps the old values bit for bit)."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def global_norm(tree: Any) -> Array:
  return optax.tree.norm(tree)


def ema_update(ema: Any, params: Any, decay: float, active: Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params when active, else ema <- params (before the start).

  Self Forcing keeps the EMA equal to the generator until its start step, then averages.
  """
  return jax.tree_util.tree_map(
      lambda e, p: jnp.where(active, decay * e + (1.0 - decay) * p, p), ema, params)
