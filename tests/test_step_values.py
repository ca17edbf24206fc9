"""The train steps checked in value: the generator's gradient is the gradient of DMD(rollout) +
alpha * ASD written out by hand (and ASD drops out at the last exit index); the discriminator's
loss is its adversarial term plus lambda times its R1/R2 term."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asd_jax.diffusion import few_step_schedule
from asd_jax.distill import losses
from asd_jax.distill.rollout import rollout
from asd_jax.models import disc, wan
from asd_jax.train import state as st
from asd_jax.train import steps as steps_lib

B, LATENT = 1, (6, 4, 4, 16)


def _gradient_recorder() -> optax.GradientTransformation:
  """An 'optimizer' whose state after an update is the gradient it was given (params unchanged)."""
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return optax.GradientTransformation(lambda params: zeros(params),
                                      lambda grads, state, params=None: (zeros(grads), grads))


@pytest.fixture(scope="module")
def setup():
  cfg = wan.WanConfig.preset("tiny")
  model = wan.WanModel(cfg)
  teacher_params = wan.init_params(cfg, jax.random.key(0))
  student = jax.tree.map(lambda a: a * 0.9, teacher_params)
  critic = jax.tree.map(lambda a: a * 1.1, teacher_params)
  hcfg = disc.DiscConfig(dim=cfg.dim, taps=(0, 1), num_queries=2, num_heads=2, mlp_dim=16,
                         num_logits=3)
  heads = disc.DiscHeads(hcfg)
  k1, k2 = jax.random.split(jax.random.key(1))
  batch = {"context": jax.random.normal(k1, (B, 5, cfg.text_dim)),
           "neg_context": jax.random.normal(k2, (B, 5, cfg.text_dim))}
  alpha = 0.5
  scfg = steps_lib.StepConfig(timesteps=few_step_schedule(4), latent_shape=LATENT, alpha=alpha,
                              ema_start=1)
  record, tx = _gradient_recorder(), st.make_optimizer(1e-3)
  step = jax.jit(steps_lib.make_steps(
      generator=model, critic=model, teacher=model, teacher_params=teacher_params, heads=heads,
      gen_tx=record, critic_tx=tx, heads_tx=tx, cfg=scfg)["generator"])
  state = st.init_state(student, critic, disc.init_heads(hcfg, jax.random.key(3)),
                        gen_tx=record, critic_tx=tx, heads_tx=tx, rng=jax.random.key(42))
  return dict(model=model, teacher_params=teacher_params, heads=heads, batch=batch, cfg=scfg,
              step=step, state=state)


def _by_hand(s, state, weight):
  """jax.grad of DMD(rollout) + weight * ASD, with the step's draws, written out here."""
  if "by_hand" not in s:  # compiled once: state and weight are arguments
    s["by_hand"] = jax.jit(lambda state, weight: _grad_by_hand(s, state, weight))
  return s["by_hand"](state, weight)


def _grad_by_hand(s, state, weight):
  m, cfg, ctx, neg = s["model"], s["cfg"], s["batch"]["context"], s["batch"]["neg_context"]
  N = len(cfg.timesteps)
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), steps_lib.GEN_TAG)
  k_exit, k_roll, k_dmd = jax.random.split(key, 3)
  k_n1, k_asd = jax.random.split(jax.random.fold_in(key, steps_lib.ASD_TAG))
  exit_index = jax.random.randint(k_exit, (), 0, N)

  def sample(params, k, e):
    k_noise, k_r = jax.random.split(k)
    noise = jax.random.normal(k_noise, (B,) + LATENT)
    return rollout(m, params, ctx, noise, timesteps=cfg.timesteps, exit_index=e, rng=k_r,
                   chunk_frames=cfg.chunk_frames)

  def logits(x_t, t):
    reps = x_t.shape[0] // B
    return disc.discriminator_logits(m, state.critic, s["heads"], state.heads, x_t, t,
                                     jnp.concatenate([ctx] * reps))

  def total(params):
    x = sample(params, k_roll, exit_index)
    dmd, _ = losses.dmd_loss(x, ctx, neg, teacher=m, teacher_params=s["teacher_params"],
                             critic=m, critic_params=state.critic, rng=k_dmd,
                             guidance=cfg.guidance, shift=cfg.shift, t_min=cfg.t_min,
                             t_max=cfg.t_max)
    n = jnp.minimum(exit_index + 1, N - 1)  # the (n+1)-step partner of an n = exit + 1 sample
    partner = jax.lax.stop_gradient(sample(state.generator, k_n1, n))
    asd, _ = losses.asd_generator_loss(logits, x, partner, n, k_asd, t_law=cfg.t_law,
                                       timesteps=cfg.timesteps, shift=cfg.shift,
                                       t_min=cfg.t_min, t_max=cfg.t_max)
    return dmd + weight * asd

  return exit_index, jax.grad(total)(state.generator)


def _step_with_exit(s, exit_index):
  """The state at the first step number whose draw exits at `exit_index`."""
  N = len(s["cfg"].timesteps)
  for k in range(100):
    key = jax.random.fold_in(jax.random.fold_in(s["state"].rng, k), steps_lib.GEN_TAG)
    if int(jax.random.randint(jax.random.split(key, 3)[0], (), 0, N)) == exit_index:
      return s["state"].replace(step=jnp.int32(k))
  raise AssertionError(f"no step in 100 exits at {exit_index}")


def _distance(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                           jax.tree.leaves(b)))


def _scale(a):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


@pytest.mark.slow  # two compiles of a rollout's gradient
@pytest.mark.parametrize("exit_index", [1, 3])
def test_generator_gradient_is_dmd_of_the_rollout_plus_alpha_asd(setup, exit_index):
  s, N = setup, len(setup["cfg"].timesteps)
  state = _step_with_exit(s, exit_index)
  new, metrics = s["step"](state, s["batch"])
  grads = new.gen_opt  # the recorder's state: the step's gradient
  assert _distance(new.generator, state.generator) == 0.0
  e, with_asd = _by_hand(s, state, s["cfg"].alpha)
  _, dmd_only = _by_hand(s, state, 0.0)
  assert int(e) == exit_index == int(metrics["exit_index"])
  tol = 1e-4 * _scale(dmd_only)
  asd_part = _distance(with_asd, dmd_only)  # what the ASD term adds to the gradient
  assert asd_part > 100 * tol, (asd_part, tol)  # the check below can tell ASD on from off
  if exit_index < N - 1:
    assert float(metrics["asd_active"]) == 1.0
    assert _distance(grads, with_asd) < tol
  else:  # the last exit: N steps have no (N+1)-step partner, ASD is off
    assert float(metrics["asd_active"]) == 0.0
    assert _distance(grads, dmd_only) < tol


def test_discriminator_loss_is_adversarial_plus_lambda_times_r1_r2():
  """A hand-made linear discriminator (one weight vector per D_n) at t = 0 (no pair noise): the
  loss equals mean(softplus(-(f(x_n1) - f(x_n)))) + lambda * mean(0.5 ((f(x_n1) - f(x_n1 +
  sigma e))^2 + (f(x_n) - f(x_n + sigma e'))^2)), from the inputs the discriminator was shown."""
  shape = (2, 3, 4, 4, 2)
  D = math.prod(shape[1:])
  w = jax.random.normal(jax.random.key(7), (3, D)) / math.sqrt(D)  # logits of D_1, D_2, D_3
  k1, k2 = jax.random.split(jax.random.key(8))
  x_n = jax.random.normal(k1, shape)
  x_n1 = x_n + 0.3 * jax.random.normal(k2, shape)
  seen = []

  def linear(x_t, t):
    seen.append(np.asarray(x_t))
    return x_t.reshape(x_t.shape[0], -1) @ w.T

  n, r_lambda, r_sigma = 2, 600.0, 0.05
  loss, m = losses.asd_discriminator_loss(linear, x_n, x_n1, jnp.int32(n), jax.random.key(9),
                                          t_min=0.0, t_max=0.0, r_lambda=r_lambda,
                                          r_sigma=r_sigma)
  (batch,) = seen
  b = shape[0]
  real, fake, real_p, fake_p = (batch[i * b:(i + 1) * b] for i in range(4))
  np.testing.assert_array_equal(real, x_n1)  # t = 0: Psi is the identity
  np.testing.assert_array_equal(fake, x_n)
  for p, x in ((real_p, real), (fake_p, fake)):  # the R1/R2 perturbations: sigma * N(0, 1)
    assert abs(float(np.std(p - x)) / r_sigma - 1.0) < 0.15
  f = lambda x: np.asarray(x.reshape(b, -1) @ np.asarray(w[n - 1], np.float64))  # D_n
  adv = np.mean(np.logaddexp(0.0, -(f(real) - f(fake))))
  reg = np.mean(0.5 * ((f(real) - f(real_p))**2 + (f(fake) - f(fake_p))**2))
  assert 0.1 < adv / (adv + r_lambda * reg) < 0.9  # both terms weigh in the check
  assert float(loss) == pytest.approx(adv + r_lambda * reg, rel=1e-5)
  assert float(m["disc_adv"]) == pytest.approx(adv, rel=1e-5)
  assert float(m["disc_reg"]) == pytest.approx(reg, rel=1e-5)
