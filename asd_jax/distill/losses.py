"""The losses of ODE initialisation, DMD, the critic and Adversarial Self-Distillation.

ALGORITHM.md sections 5-7 and 9. Every loss is computed in float32 and returns (loss, metrics);
non-finite values are never hidden here (the train step detects and reports them).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_v
from asd_jax.diffusion.schedule import shift_sigma

Array = jax.Array


def sample_timesteps(rng: Array, batch: int, *, shift: float = 5.0, t_min: float = 20.0,
                     t_max: float = 980.0) -> Array:
  """DMD/critic timesteps [B]: u ~ U[0, 1000), shifted, clamped to [t_min, t_max]."""
  s = jax.random.uniform(rng, (batch,), jnp.float32)
  t = shift_sigma(s, shift) * NUM_TRAIN_TIMESTEPS
  return jnp.clip(t, t_min, t_max)


def _mean_except_batch(x: Array) -> Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def dmd_gradient(x: Array, x0_real: Array, x0_fake: Array) -> tuple[Array, Array]:
  """DMD's gradient direction (x0_fake - x0_real) / mean|x - x0_real| and that normaliser [B]."""
  norm = _mean_except_batch(jnp.abs(x - x0_real))
  return (x0_fake - x0_real) / norm, norm.reshape(-1)


def dmd_loss_from_gradient(x: Array, grad: Array) -> Array:
  """0.5 * mean((x - sg(x - grad))^2): its gradient w.r.t. x is grad / x.size."""
  target = jax.lax.stop_gradient(x - grad)
  return 0.5 * jnp.mean((x - target)**2)


def dmd_loss(x: Array, context: Array, neg_context: Array, *, teacher: Any, teacher_params: Any,
             critic: Any, critic_params: Any, rng: Array, guidance: float = 3.0,
             shift: float = 5.0, t_min: float = 20.0, t_max: float = 980.0):
  """Distribution matching loss on generator samples x [B, F, H, W, C] (gradient flows into x).

  real x0 = teacher with CFG on the negative prompt: x0_c + g (x0_c - x0_u); fake x0 = critic.
  """
  x = x.astype(jnp.float32)
  B = x.shape[0]
  k_t, k_eps = jax.random.split(rng)
  t = sample_timesteps(k_t, B, shift=shift, t_min=t_min, t_max=t_max)
  x_t = jax.lax.stop_gradient(add_noise(x, jax.random.normal(k_eps, x.shape), t))
  tt = jnp.concatenate([t, t])
  v = teacher.apply({"params": jax.lax.stop_gradient(teacher_params)},
                    jnp.concatenate([x_t, x_t]), tt, jnp.concatenate([context, neg_context]))
  x0_cond = x0_from_v(x_t, v[:B], t)
  x0_uncond = x0_from_v(x_t, v[B:], t)
  x0_real = x0_cond + guidance * (x0_cond - x0_uncond)
  x0_fake = x0_from_v(x_t, critic.apply({"params": jax.lax.stop_gradient(critic_params)}, x_t, t,
                                        context), t)
  xs = jax.lax.stop_gradient(x)
  grad, norm = dmd_gradient(xs, jax.lax.stop_gradient(x0_real), jax.lax.stop_gradient(x0_fake))
  loss = dmd_loss_from_gradient(x, grad)
  return loss, {"dmd_loss": loss, "dmd_normaliser": jnp.mean(norm),
                "dmd_grad_rms": jnp.sqrt(jnp.mean(grad**2)), "dmd_t_mean": jnp.mean(t)}


def critic_loss(x: Array, context: Array, *, critic: Any, critic_params: Any, rng: Array,
                shift: float = 5.0, t_min: float = 20.0, t_max: float = 980.0):
  """Unweighted flow matching of the fake score on generator samples x (no gradient into x)."""
  x = jax.lax.stop_gradient(x.astype(jnp.float32))
  k_t, k_eps = jax.random.split(rng)
  t = sample_timesteps(k_t, x.shape[0], shift=shift, t_min=t_min, t_max=t_max)
  eps = jax.random.normal(k_eps, x.shape)
  v = critic.apply({"params": critic_params}, add_noise(x, eps, t), t, context)
  loss = jnp.mean((v.astype(jnp.float32) - (eps - x))**2)
  return loss, {"critic_loss": loss}


# The noise level of the ASD noising Psi (both sides of a pair share one t per row):
#   "dmd":      DMD's law (u ~ U[0, 1), shifted, clamped to [t_min, t_max]): the first
#               implementation's choice; mean signal weight 1 - t/1000 about 0.25 at shift 5;
#   "schedule": the paper's Algorithm 1, line 7: t ~ Uniform over the few-step timesteps
#               (1000, 937.5, 833.3, 625 warped: mean signal weight about 0.15);
#   "uniform":  u ~ U[t_min, t_max] without the shift (mean signal weight about 0.5): this
#               project's, chosen from the toy measurement in docs/toy_results.md.
T_LAWS = ("dmd", "schedule", "uniform")
# The R1/R2 finite difference: "eq6" is the paper's Eq. 6 as written, f(x) - f(x + sigma eps');
# "sigma" divides it by sigma, (f(x) - f(x + sigma eps')) / sigma, as Self Forcing's GAN code does
# (1 / sigma^2 = 400x stronger at sigma 0.05).
R_FORMS = ("eq6", "sigma")


def asd_timesteps(rng: Array, batch: int, *, t_law: str = "dmd", timesteps=(),
                  shift: float = 5.0, t_min: float = 20.0, t_max: float = 980.0) -> Array:
  """Timesteps [B] of the ASD noising under `t_law` (see T_LAWS); `timesteps`: the warped
  few-step schedule (read by the "schedule" law only)."""
  if t_law == "dmd":
    return sample_timesteps(rng, batch, shift=shift, t_min=t_min, t_max=t_max)
  if t_law == "schedule":
    if not len(timesteps):
      raise ValueError("t_law 'schedule' needs the few-step timesteps.")
    table = jnp.asarray(tuple(float(t) for t in timesteps), jnp.float32)
    return table[jax.random.randint(rng, (batch,), 0, len(table))]
  if t_law == "uniform":
    return jax.random.uniform(rng, (batch,), jnp.float32, t_min, t_max)
  raise ValueError(f"unknown asd t_law {t_law!r}; use one of {T_LAWS}.")


def _pick(logits: Array, n: Array) -> Array:
  """logit n - 1 of each row: D_n (n = 1..N-1, an int scalar shared by the batch)."""
  idx = jnp.broadcast_to(jnp.asarray(n, jnp.int32) - 1, logits.shape[:1])
  return jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]


def _noised_pair(x_n: Array, x_n1: Array, rng: Array, t_kw: dict) -> tuple[Array, Array, Array]:
  """Psi of both sides at one shared timestep per row, independent noise: (xt_n, xt_n1, t)."""
  k_t, k_a, k_b = jax.random.split(rng, 3)
  t = asd_timesteps(k_t, x_n.shape[0], **t_kw)
  return (add_noise(x_n, jax.random.normal(k_a, x_n.shape), t),
          add_noise(x_n1, jax.random.normal(k_b, x_n1.shape), t), t)


def asd_discriminator_loss(disc_fn, x_n: Array, x_n1: Array, n: Array, rng: Array, *,
                           t_law: str = "dmd", timesteps=(), shift: float = 5.0,
                           t_min: float = 20.0, t_max: float = 980.0, r_lambda: float = 600.0,
                           r_sigma: float = 0.05, r_form: str = "eq6"):
  """Relativistic pairing loss with the R1/R2 finite-difference penalties (the D step).

  disc_fn(x_t [M, ...], t [M]) -> logits [M, N-1]: the backbone is frozen inside it, only the heads
  are differentiated. x_n, x_n1: n-step and (n+1)-step samples (no gradient into them); n: int
  scalar in [1, N-1]. t_law / timesteps: the noise level (`asd_timesteps`); r_form: R_FORMS.
  """
  if r_form not in R_FORMS:
    raise ValueError(f"unknown asd r_form {r_form!r}; use one of {R_FORMS}.")
  x_n, x_n1 = (jax.lax.stop_gradient(a.astype(jnp.float32)) for a in (x_n, x_n1))
  k_pair, k_ra, k_rb = jax.random.split(rng, 3)
  xt_n, xt_n1, t = _noised_pair(x_n, x_n1, k_pair, dict(t_law=t_law, timesteps=timesteps,
                                                          shift=shift, t_min=t_min, t_max=t_max))
  batch = jnp.concatenate([xt_n1, xt_n, xt_n1 + r_sigma * jax.random.normal(k_ra, x_n.shape),
                           xt_n + r_sigma * jax.random.normal(k_rb, x_n.shape)])
  f = _pick(disc_fn(batch, jnp.concatenate([t] * 4)), n)
  f_n1, f_n, f_n1_p, f_n_p = jnp.split(f, 4)
  adv = jax.nn.softplus(-(f_n1 - f_n))
  scale = 1.0 / r_sigma if r_form == "sigma" else 1.0
  reg = 0.5 * ((scale * (f_n1 - f_n1_p))**2 + (scale * (f_n - f_n_p))**2)
  loss = jnp.mean(adv + r_lambda * reg)
  return loss, {"disc_loss": loss, "disc_adv": jnp.mean(adv), "disc_reg": jnp.mean(reg),
                "disc_logit_gap": jnp.mean(f_n1 - f_n), "disc_t_mean": jnp.mean(t)}


def asd_generator_loss(disc_fn, x_n: Array, x_n1: Array, n: Array, rng: Array, *,
                       t_law: str = "dmd", timesteps=(), shift: float = 5.0, t_min: float = 20.0,
                       t_max: float = 980.0):
  """softplus(-(f(x_n) - f(x_n1))): the generator's ASD loss; gradient reaches it through x_n only."""
  x_n = x_n.astype(jnp.float32)
  x_n1 = jax.lax.stop_gradient(x_n1.astype(jnp.float32))
  xt_n, xt_n1, t = _noised_pair(x_n, x_n1, rng, dict(t_law=t_law, timesteps=timesteps,
                                                     shift=shift, t_min=t_min, t_max=t_max))
  f = _pick(disc_fn(jnp.concatenate([xt_n, xt_n1]), jnp.concatenate([t, t])), n)
  f_n, f_n1 = jnp.split(f, 2)
  loss = jnp.mean(jax.nn.softplus(-(f_n - f_n1)))
  return loss, {"asd_loss": loss, "asd_logit_gap": jnp.mean(f_n1 - f_n)}


def asd_pair_logits(disc_fn, x_n: Array, x_n1: Array, n: Array, rng: Array, **t_kw):
  """D_n's logits (f(Psi(x_n)), f(Psi(x_n1))), each [B], noised as the D and G losses noise them
  (`_noised_pair`; t_kw: t_law, timesteps, shift, t_min, t_max): the held-out AUC's scores."""
  xt_n, xt_n1, t = _noised_pair(x_n.astype(jnp.float32), x_n1.astype(jnp.float32), rng, t_kw)
  f = _pick(disc_fn(jnp.concatenate([xt_n, xt_n1]), jnp.concatenate([t, t])), n)
  return tuple(jnp.split(f, 2))


def pair_auc(scores_n1, scores_n) -> float:
  """P(f(x_n1) > f(x_n)) + P(tie) / 2 over every (n+1, n) pair (the Mann-Whitney AUC; 0.5 is
  chance, 1 a discriminator that always ranks the (n+1)-step sample higher)."""
  a = np.asarray(scores_n1, np.float64).reshape(-1, 1)
  b = np.asarray(scores_n, np.float64).reshape(1, -1)
  return float(np.mean(a > b) + 0.5 * np.mean(a == b))


def auc_chance_band(m: int, n: int) -> float:
  """Two standard errors of the AUC of m against n scores when D cannot tell them apart
  (sqrt((m + n + 1) / (12 m n)) each, Mann-Whitney under the null): AUCs below 0.5 + this are
  indistinguishable from chance."""
  return 2.0 * math.sqrt((m + n + 1) / (12.0 * m * n))


def ode_regression_loss(student: Any, params: Any, noisy: Array, clean: Array, timesteps: Array,
                        context: Array, rng: Array, *, chunk_frames: int = 3):
  """Block-causal regression onto the teacher's ODE end point (ALGORITHM.md section 9).

  noisy [B, K, F, H, W, C]: the teacher trajectory at the K training timesteps [K]; clean
  [B, F, H, W, C]. Each chunk of each sample picks one of the K timesteps at random.
  """
  B, K, F = noisy.shape[:3]
  n = F // chunk_frames
  pick = jax.random.randint(rng, (B, n), 0, K)
  pick_f = jnp.repeat(pick, chunk_frames, axis=1)  # [B, F]
  x = jnp.take_along_axis(noisy, pick_f[:, None, :, None, None, None], axis=1)[:, 0]
  t = jnp.asarray(timesteps, jnp.float32)[pick_f]  # [B, F] per-frame timesteps
  v = student.apply({"params": params}, x, t, context, causal=True)
  x0 = x0_from_v(x, v, t)
  loss = jnp.mean((x0.astype(jnp.float32) - clean.astype(jnp.float32))**2)
  return loss, {"ode_loss": loss}
