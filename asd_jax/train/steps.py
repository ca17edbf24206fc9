"""Pure generator, critic, discriminator and ODE-regression steps: `state, metrics = step(state, batch)`.

`make_steps(...)` closes over the modules, the frozen teacher and the static settings and returns
plain functions of (state, batch[, index]) to jit once (with shardings and donation) in the loop.
Randomness: the step's key is fold_in(state.rng, state.step), then fold_in(key, tag) per phase
(generator 0, critic 1 + j, discriminator 1000 + j), so a resumed run draws the same numbers.
The generator's ASD-only draws (the (n+1)-step partner, the ASD noising) come from their own
stream, fold_in(generator key, ASD_TAG): the rollout, exit and DMD draws do not depend on alpha,
so arms of an ablation that differ in alpha draw the same numbers (paired arms). Batches are
paired too: `cycle_substeps` numbers the generator and critic batches of a cycle apart from the
discriminator's, so a baseline without discriminator steps reads the same prompts.
With `StepConfig.accum` = k > 1 a step splits its batch into k microbatches (row b goes to
microbatch b mod k, so each stays spread over the devices), runs them one after the other under a
scan and averages their losses and gradients: one update of the whole batch with the activations
of B / k samples. The step-level draws (exit index, n) are shared; each microbatch folds its index
into the other keys.
A non-finite loss or gradient skips that update (the state keeps its old values bit for bit), counts
it in `state.skipped`, and reports `nonfinite` = 1 in the metrics.

batch: {'context': [B, L, D], 'neg_context': [B, L, D]} for distillation;
       {'noisy': [B, K, F, H, W, C], 'clean': [B, F, H, W, C], 'context': [B, L, D]} for ODE init
       (the K stored timesteps are the static training schedule);
       {'clean': [B, F, H, W, C], 'context', 'neg_context'} for pretraining.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from asd_jax.distill import losses
from asd_jax.distill.rollout import rollout
from asd_jax.models import disc
from asd_jax.train.state import TrainState, all_finite, apply_if, ema_update, global_norm

Array = jax.Array

GEN_TAG, CRITIC_TAG, DISC_TAG = 0, 1, 1000
ASD_TAG = 2000  # folded into the generator's key: its ASD-only draws
# The held-out AUC's key: fold_in(state.rng, AUC_STEP), a step number no run reaches, so its pool
# of samples and noise is fixed for the whole run and never drawn by a training step.
AUC_STEP = 2**31 - 1
# Data sub-steps of the discriminator's batches start here (see `cycle_substeps`), those of the
# held-out AUC pool at AUC_STREAM: far from the generator's and critic's consecutive sub-steps.
DISC_STREAM, AUC_STREAM = 1 << 40, 1 << 41


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the steps (from the run config)."""
  timesteps: tuple[float, ...]  # the warped training schedule, N entries
  latent_shape: tuple[int, int, int, int]  # F, H, W, C
  chunk_frames: int = 3
  alpha: float = 0.01  # weight of the ASD loss (0: the Self Forcing baseline)
  guidance: float = 3.0  # DMD real-score CFG: x0_c + g (x0_c - x0_u)
  shift: float = 5.0
  t_min: float = 20.0
  t_max: float = 980.0
  r_lambda: float = 600.0
  r_sigma: float = 0.05
  t_law: str = "dmd"  # the ASD noise level: asd_jax.distill.losses.T_LAWS
  r_form: str = "eq6"  # the R1/R2 difference: asd_jax.distill.losses.R_FORMS
  ema_decay: float = 0.99
  ema_start: int = 200
  accum: int = 1  # microbatches per step (gradient accumulation); 1: the whole batch at once


def _key(state: TrainState, tag: int) -> Array:
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), tag)


def split_microbatches(x: Array, accum: int, sharding: Any = None) -> Array:
  """[B, ...] -> [accum, B / accum, ...]; microbatch j holds rows j, j + accum, j + 2 accum, ...

  A batch split over D devices in contiguous blocks (B / D rows each) gives every device
  B / (D accum) rows of every microbatch when B / accum is a multiple of D. `sharding`, when
  given, is imposed on the result (its first axis unsplit).
  """
  B = x.shape[0]
  if B % accum:
    raise ValueError(f"batch of {B} rows cannot be split into {accum} microbatches.")
  y = jnp.swapaxes(x.reshape((B // accum, accum) + x.shape[1:]), 0, 1)
  return y if sharding is None else jax.lax.with_sharding_constraint(y, sharding)


def accumulate(loss_fn: Callable, params: Any, batch: dict, keys: Any, accum: int,
               sharding: Any = None) -> tuple[tuple[Array, dict], Any]:
  """`jax.value_and_grad(loss_fn, has_aux=True)(params, batch, keys)` over `accum` microbatches.

  Each microbatch folds its index into every key of `keys`; the loss, the metrics and the
  gradients are the microbatches' means (equal to the whole batch's for losses that are means
  over rows, up to the draws). accum = 1 is exactly the plain call.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    return grad_fn(params, batch, keys)
  micro = jax.tree.map(lambda x: split_microbatches(x, accum, sharding), batch)

  def body(carry, xs):
    mb, i = xs
    (loss, metrics), grads = grad_fn(params, mb, jax.tree.map(
        lambda k: jax.random.fold_in(k, i), keys))
    loss_sum, grad_sum = carry
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), metrics

  zeros = (jnp.zeros((), jnp.float32),
           jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  (loss, grads), metrics = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
  grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
  metrics = jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32), axis=0), metrics)
  return (loss / accum, metrics), grads


def _update(tx, grads, opt_state, params):
  updates, new_opt = tx.update(grads, opt_state, params)
  return jax.tree_util.tree_map(lambda p, u: p + u, params, updates), new_opt


def make_steps(*, generator: Any, critic: Any, teacher: Any, teacher_params: Any,
               heads: disc.DiscHeads | None, gen_tx, critic_tx, heads_tx,
               cfg: StepConfig, micro_sharding: Any = None) -> dict[str, Callable]:
  """The step functions of a distillation run (DMD, with ASD when alpha > 0 and heads given).

  micro_sharding: with cfg.accum > 1, the sharding of the [accum, B / accum, ...] microbatches
  (see `split_microbatches`), or None to leave it to the compiler.
  """
  acc = functools.partial(accumulate, accum=cfg.accum, sharding=micro_sharding)
  N = len(cfg.timesteps)
  noise_shape = cfg.latent_shape
  loss_kw = dict(shift=cfg.shift, t_min=cfg.t_min, t_max=cfg.t_max)
  asd_kw = dict(loss_kw, t_law=cfg.t_law, timesteps=cfg.timesteps)
  use_asd = cfg.alpha > 0 and heads is not None

  def draw(params, context, key, exit_index):
    k_noise, k_roll = jax.random.split(key)
    noise = jax.random.normal(k_noise, (context.shape[0],) + noise_shape)
    return rollout(generator, params, context, noise, timesteps=cfg.timesteps,
                   exit_index=exit_index, rng=k_roll, chunk_frames=cfg.chunk_frames)

  def disc_fn(critic_params, heads_params, context):
    def fn(x_t, t):
      reps = x_t.shape[0] // context.shape[0]
      return disc.discriminator_logits(critic, jax.lax.stop_gradient(critic_params), heads,
                                       heads_params, x_t, t, jnp.concatenate([context] * reps))
    return fn

  def generator_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = _key(state, GEN_TAG)
    k_exit, k_roll, k_dmd = jax.random.split(key, 3)
    k_n1, k_asd = jax.random.split(jax.random.fold_in(key, ASD_TAG))
    exit_index = jax.random.randint(k_exit, (), 0, N)

    def loss_fn(params, batch, keys):
      k_roll, k_dmd, k_n1, k_asd = keys
      ctx, neg = batch["context"], batch["neg_context"]
      x = draw(params, ctx, k_roll, exit_index)
      dmd, metrics = losses.dmd_loss(x, ctx, neg, teacher=teacher, teacher_params=teacher_params,
                                     critic=critic, critic_params=state.critic, rng=k_dmd,
                                     guidance=cfg.guidance, **loss_kw)
      total = dmd
      if use_asd:
        # n = exit + 1 steps against n + 1 (independent noise, no gradient); the last step has no
        # (n + 1)-step partner, so its ASD term is dropped.
        n = exit_index + 1
        x_n1 = jax.lax.stop_gradient(draw(state.generator, ctx, k_n1, jnp.minimum(n, N - 1)))
        asd, m_asd = losses.asd_generator_loss(disc_fn(state.critic, state.heads, ctx), x,
                                               x_n1, jnp.minimum(n, N - 1), k_asd, **asd_kw)
        active = (n < N).astype(jnp.float32)
        total = total + cfg.alpha * active * asd
        metrics = {**metrics, **m_asd, "asd_active": active}
      metrics["latent_mean"] = jnp.mean(x)
      metrics["latent_std"] = jnp.std(x)
      return total, metrics

    (loss, metrics), grads = acc(loss_fn, state.generator, batch, (k_roll, k_dmd, k_n1, k_asd))
    new_params, new_opt = _update(gen_tx, grads, state.gen_opt, state.generator)
    ok = all_finite(loss, grads)
    new_params = apply_if(ok, new_params, state.generator)
    new_opt = apply_if(ok, new_opt, state.gen_opt)
    ema = ema_update(state.generator_ema, new_params, cfg.ema_decay, state.step >= cfg.ema_start)
    ema = apply_if(ok, ema, state.generator_ema)
    state = state.replace(generator=new_params, gen_opt=new_opt, generator_ema=ema,
                          step=state.step + 1, skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics.update(generator_loss=loss, generator_grad_norm=global_norm(grads),
                   exit_index=exit_index, nonfinite=(~ok).astype(jnp.float32))
    return state, metrics

  def critic_step(state: TrainState, batch: dict, index: Array) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(_key(state, CRITIC_TAG), index)
    k_exit, k_roll, k_loss = jax.random.split(key, 3)
    exit_index = jax.random.randint(k_exit, (), 0, N)

    def loss_fn(params, batch, keys):
      k_roll, k_loss = keys
      x = jax.lax.stop_gradient(draw(state.generator, batch["context"], k_roll, exit_index))
      return losses.critic_loss(x, batch["context"], critic=critic, critic_params=params,
                                rng=k_loss, **loss_kw)

    (loss, metrics), grads = acc(loss_fn, state.critic, batch, (k_roll, k_loss))
    new_params, new_opt = _update(critic_tx, grads, state.critic_opt, state.critic)
    ok = all_finite(loss, grads)
    state = state.replace(critic=apply_if(ok, new_params, state.critic),
                          critic_opt=apply_if(ok, new_opt, state.critic_opt),
                          skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics.update(critic_grad_norm=global_norm(grads), nonfinite=(~ok).astype(jnp.float32))
    return state, metrics

  def disc_step(state: TrainState, batch: dict, index: Array) -> tuple[TrainState, dict]:
    if heads is None:
      raise ValueError("disc_step needs discriminator heads (an ASD config).")
    key = jax.random.fold_in(_key(state, DISC_TAG), index)
    k_n, k_a, k_b, k_loss = jax.random.split(key, 4)
    n = jax.random.randint(k_n, (), 1, N)  # D_n for n = 1..N-1

    def loss_fn(heads_params, batch, keys):
      k_a, k_b, k_loss = keys
      ctx = batch["context"]
      x_n = jax.lax.stop_gradient(draw(state.generator, ctx, k_a, n - 1))
      x_n1 = jax.lax.stop_gradient(draw(state.generator, ctx, k_b, n))
      return losses.asd_discriminator_loss(disc_fn(state.critic, heads_params, ctx), x_n, x_n1, n,
                                           k_loss, r_lambda=cfg.r_lambda, r_sigma=cfg.r_sigma,
                                           r_form=cfg.r_form, **asd_kw)

    (loss, metrics), grads = acc(loss_fn, state.heads, batch, (k_a, k_b, k_loss))
    new_params, new_opt = _update(heads_tx, grads, state.heads_opt, state.heads)
    ok = all_finite(loss, grads)
    state = state.replace(heads=apply_if(ok, new_params, state.heads),
                          heads_opt=apply_if(ok, new_opt, state.heads_opt),
                          skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics.update(disc_grad_norm=global_norm(grads), disc_n=n,
                   nonfinite=(~ok).astype(jnp.float32))
    return state, metrics

  def disc_auc_scores(state: TrainState, batch: dict, chunk: Array) -> dict:
    """D_n's scores on chunk `chunk` of the held-out pool, for every n = 1..N-1.

    The pool: the batch's prompts, n-step and (n+1)-step samples of the current generator from
    noise drawn with the fixed AUC key (fold_in(state.rng, AUC_STEP)), noised as the D step
    noises them. Returns {'f_n': [N-1, B], 'f_n1': [N-1, B]}; `pair_auc` of each row is the AUC.
    """
    if heads is None:
      raise ValueError("disc_auc_scores needs discriminator heads (an ASD config).")
    key = jax.random.fold_in(jax.random.fold_in(state.rng, AUC_STEP), chunk)
    ctx = batch["context"]
    fn = disc_fn(state.critic, state.heads, ctx)
    f_n, f_n1 = [], []
    for n in range(1, N):
      k_a, k_b, k_noise = jax.random.split(jax.random.fold_in(key, n), 3)
      x_n = draw(state.generator, ctx, k_a, n - 1)
      x_n1 = draw(state.generator, ctx, k_b, n)
      a, b = losses.asd_pair_logits(fn, x_n, x_n1, jnp.int32(n), k_noise, **asd_kw)
      f_n.append(a)
      f_n1.append(b)
    return {"f_n": jnp.stack(f_n), "f_n1": jnp.stack(f_n1)}

  return {"generator": generator_step, "critic": critic_step, "disc": disc_step,
          "disc_auc": disc_auc_scores}


def make_ode_step(*, student: Any, tx, timesteps: tuple[float, ...],
                  chunk_frames: int = 3, accum: int = 1, micro_sharding: Any = None) -> Callable:
  """ODE-initialisation step: block-causal regression of the student onto teacher ODE end points.

  Uses `state.generator` / `state.gen_opt` (critic and heads are untouched); the EMA slot holds a
  copy of the generator (ODE initialisation keeps no average). accum, micro_sharding: gradient
  accumulation over microbatches, see `accumulate`.
  """

  def ode_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = _key(state, GEN_TAG)

    def loss_fn(params, batch, key):
      return losses.ode_regression_loss(student, params, batch["noisy"], batch["clean"],
                                        jnp.asarray(timesteps, jnp.float32), batch["context"],
                                        key, chunk_frames=chunk_frames)

    (loss, metrics), grads = accumulate(loss_fn, state.generator, batch, key, accum,
                                        micro_sharding)
    new_params, new_opt = _update(tx, grads, state.gen_opt, state.generator)
    ok = all_finite(loss, grads)
    new_params = apply_if(ok, new_params, state.generator)
    state = state.replace(generator=new_params, generator_ema=new_params,
                          gen_opt=apply_if(ok, new_opt, state.gen_opt), step=state.step + 1,
                          skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics.update(generator_grad_norm=global_norm(grads), nonfinite=(~ok).astype(jnp.float32))
    return state, metrics

  return ode_step


def make_pretrain_step(*, model: Any, tx, shift: float = 5.0, t_min: float = 20.0,
                       t_max: float = 980.0, cfg_dropout: float = 0.1, ema_decay: float = 0.99,
                       ema_start: int = 200) -> Callable:
  """Flow-matching step of a bidirectional model on data (teacher pretraining / fine-tuning).

  batch: {'clean': [B, F, H, W, C], 'context': [B, L, D], 'neg_context': [B, L, D]}. Each row's
  context is replaced by the negative (null) one with probability `cfg_dropout`, so the model
  also learns the unconditional velocity that classifier-free guidance needs. The loss is the
  critic's (`losses.critic_loss`: unweighted, shifted timesteps in [t_min, t_max]); the EMA is
  kept as in distillation.
  """

  def pretrain_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = _key(state, GEN_TAG)
    k_drop, k_loss = jax.random.split(key)
    ctx = batch["context"]
    drop = jax.random.bernoulli(k_drop, cfg_dropout, (ctx.shape[0], 1, 1))
    ctx = jnp.where(drop, batch["neg_context"], ctx)

    def loss_fn(params):
      return losses.critic_loss(batch["clean"], ctx, critic=model, critic_params=params,
                                rng=k_loss, shift=shift, t_min=t_min, t_max=t_max)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.generator)
    new_params, new_opt = _update(tx, grads, state.gen_opt, state.generator)
    ok = all_finite(loss, grads)
    new_params = apply_if(ok, new_params, state.generator)
    ema = ema_update(state.generator_ema, new_params, ema_decay, state.step >= ema_start)
    state = state.replace(generator=new_params, gen_opt=apply_if(ok, new_opt, state.gen_opt),
                          generator_ema=apply_if(ok, ema, state.generator_ema),
                          step=state.step + 1, skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = {"flow_loss": metrics["critic_loss"], "generator_grad_norm": global_norm(grads),
               "nonfinite": (~ok).astype(jnp.float32)}
    return state, metrics

  return pretrain_step


def cycle_substeps(step: int, ratio: tuple[int, int, int]) -> dict[str, list[int]]:
  """The data sub-steps of the batches of cycle `step`, per network.

  Generator and critic batches run consecutively over the stream (cycle s: sub-steps
  s (g + c) .. s (g + c) + g + c - 1); the discriminator's come from their own stream from
  DISC_STREAM on. Arms that differ only in their discriminator updates (the Self Forcing
  baseline 1:4:0 against ASD 1:4:1) therefore train the generator and critic on the same prompts.
  """
  g, c, d = (int(r) for r in ratio)
  first = step * (g + c)
  return {"generator": [first + j for j in range(g)],
          "critic": [first + g + j for j in range(c)],
          "disc": [DISC_STREAM + step * d + j for j in range(d)]}


def run_cycle(steps: dict[str, Callable], state: TrainState, batches: dict[str, Any],
              ratio: tuple[int, int, int]) -> tuple[TrainState, dict]:
  """One update-ratio cycle: generator x ratio[0], critic x ratio[1], discriminator x ratio[2].

  `steps` are the (jitted) functions of `make_steps`; batches['generator'|'critic'|'disc'] are
  lists of batches, one per update of that network. Returns the state and the last metrics of each.
  """
  metrics = {}
  for name, count in zip(("generator", "critic", "disc"), ratio):
    for j in range(count):
      if name == "generator":
        state, m = steps[name](state, batches[name][j])
      else:
        state, m = steps[name](state, batches[name][j], jnp.int32(j))
      metrics.update({k if k.startswith(name) else f"{name}/{k}": v for k, v in m.items()})
  return state, metrics
