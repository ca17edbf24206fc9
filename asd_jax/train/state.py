"""The training state: one pytree with every network, its optimizer state, the step and the key."""

from __future__ import annotations

from typing import Any, NamedTuple

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


class ScaleByRmsAdamState(NamedTuple):
  """Adam's state without the first moment: the step count and the second moment."""
  count: Array  # int32 scalar
  nu: Any


def scale_by_adam_no_momentum(b2: float = 0.999, eps: float = 1e-8,
                              eps_root: float = 0.0) -> optax.GradientTransformation:
  """`optax.scale_by_adam(b1=0)` without its first moment, bit for bit the same updates.

  With b1 = 0 Adam's first moment is the current gradient ((1 - 0) g + 0 mu = g) and its bias
  correction divides by 1 - 0^count = 1, so the update is g / (sqrt(nu_hat + eps_root) + eps);
  storing mu would cost one float32 copy of the network (5.2 GB for Wan 1.3B) for nothing.
  """

  def init_fn(params):
    return ScaleByRmsAdamState(count=jnp.zeros([], jnp.int32), nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = jax.tree.map(
        lambda g, v: None if g is None else g / (jnp.sqrt(v + eps_root) + eps), updates, nu_hat,
        is_leaf=lambda x: x is None)
    return updates, ScaleByRmsAdamState(count=count_inc, nu=optax.tree.cast_like(nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(lr: float, *, b1: float = 0.0, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01) -> optax.GradientTransformation:
  """`optax.adamw`, storing no first moment when b1 = 0 (the same updates; see
  `scale_by_adam_no_momentum`)."""
  if b1 != 0:
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.chain(scale_by_adam_no_momentum(b2=b2, eps=eps),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(lr))


def make_optimizer(lr: float, *, b1: float = 0.0, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01, clip_norm: float = 10.0) -> optax.GradientTransformation:
  """AdamW after clipping by global norm (Self Forcing's DMD settings by default).

  With b1 = 0 (Self Forcing's DMD) the state holds no first moment: one float32 copy of each
  network fewer than `optax.adamw(b1=0)`, with identical updates.
  """
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


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
