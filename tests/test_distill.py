"""The Self Forcing rollout, the discriminator heads and every distillation loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.diffusion import few_step_schedule
from asd_jax.distill import losses
from asd_jax.distill.rollout import rollout
from asd_jax.models import disc, wan
from asd_jax.sampling import chunk_key, generate

TS = few_step_schedule(4)
B, F, H, W = 2, 6, 4, 4


@pytest.fixture(scope="module")
def tiny():
  cfg = wan.WanConfig.preset("tiny")
  return wan.WanModel(cfg), wan.init_params(cfg, jax.random.key(0))


def _inputs(cfg, seed=3):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (B, 7, cfg.text_dim)), jax.random.normal(k2, (B, 7, cfg.text_dim)),
          jax.random.normal(k3, (B, F, H, W, cfg.in_channels)))


@pytest.mark.parametrize("exit_index", [0, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_rollout_values_are_an_exit_plus_one_step_generation(tiny, exit_index):
  module, params = tiny
  ctx, _, noise = _inputs(module.config)
  rng = jax.random.key(7)
  run = jax.jit(lambda p, e: rollout(module, p, ctx, noise, timesteps=TS, exit_index=e, rng=rng))
  out = run(params, exit_index)  # exit index traced: one compile serves every exit
  sched = TS[:exit_index + 1]
  ref = generate(module, params, ctx, noise, first_chunk_timesteps=sched,
                 later_chunk_timesteps=sched, rng=rng)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # chunk 0 only; the sequential-loop test below checks every chunk's gradient
def test_rollout_gradient_flows_only_through_the_exit_forward(tiny):
  """d(chunk 0 output)/d(params) equals that of one forward on the (frozen) exit input."""
  module, params = tiny
  ctx, _, noise = _inputs(module.config)
  rng, e = jax.random.key(7), 2

  def chunk0_sum(p):
    return jnp.sum(rollout(module, p, ctx, noise, timesteps=TS, exit_index=e, rng=rng)[:, :3])

  g = jax.jit(jax.grad(chunk0_sum))(params)
  # The exit input: e steps of the sampler (its last x0), re-noised to TS[e] with the same key.
  x0_prev = generate(module, params, ctx, noise[:, :3], first_chunk_timesteps=TS[:e],
                     later_chunk_timesteps=TS[:e], rng=rng)
  s = TS[e] / 1000.0
  x_e = (1 - s) * x0_prev + s * jax.random.normal(chunk_key(rng, 0, e - 1), x0_prev.shape)

  def reference(p):
    v = module.apply({"params": p}, x_e, jnp.full((B,), TS[e]), ctx)
    return jnp.sum(x_e - s * v)

  g_ref = jax.grad(reference)(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-3),
                         g, g_ref)
  # The text path learns too (cross-attention K/V of the exit forward carry gradient).
  assert float(jnp.abs(g["blocks"]["cross_attn"]["k"]["kernel"]).max()) > 0
  assert float(jnp.abs(g["text_embedding"]["fc1"]["kernel"]).max()) > 0


def _sequential_rollout(module, p, ctx, noise, e, rng):
  """Self Forcing's training loop written plainly (its `_consistency_backward_simulation` with
  gradient only at the exit step): chunk by chunk, one cache, refilled after each exit."""
  frozen = jax.lax.stop_gradient(p)
  fwd = lambda q, x, t, cache, off: module.apply({"params": q}, x, jnp.full((B,), t), cache, off,
                                                 method="forward_chunk")
  cache = module.apply({"params": frozen}, ctx, height=H, width=W, capacity_frames=F,
                       method="init_cache")
  text_k, text_v = module.apply({"params": p}, None, None, ctx, mode="context")
  outs = []
  for c in range(F // 3):
    x = noise[:, 3 * c:3 * c + 3]
    for i in range(e):
      v, cache = fwd(frozen, x, TS[i], cache, 3 * c)
      s = (TS[i + 1] if i + 1 < len(TS) else 0.0) / 1000.0
      x = (1 - s) * (x - TS[i] / 1000.0 * v) + s * jax.random.normal(chunk_key(rng, c, i), x.shape)
    t = TS[e]
    v, _ = fwd(p, x, t, cache.replace(cross_k_LBCND=text_k, cross_v_LBCND=text_v), 3 * c)
    x0 = x - t / 1000.0 * v
    outs.append(x0)
    _, cache = fwd(frozen, jax.lax.stop_gradient(x0), 0.0, cache, 3 * c)
  return jnp.concatenate(outs, axis=1)


def test_rollout_gradient_over_every_chunk_equals_the_sequential_loop(tiny):
  """The two-pass rollout (second pass against the final cache) has the gradient of the plain
  chunk-by-chunk loop, for the later chunks too, whose exit forwards read the cached frames."""
  module, params = tiny
  ctx, _, noise = _inputs(module.config)
  rng, exit_index = jax.random.key(7), 1
  w = jax.random.normal(jax.random.key(11), noise.shape)
  loss = lambda p: jnp.sum(w * rollout(module, p, ctx, noise, timesteps=TS,
                                       exit_index=exit_index, rng=rng))
  ref = lambda p: jnp.sum(w * _sequential_rollout(module, p, ctx, noise, exit_index, rng))
  (l, g), (l_ref, g_ref) = jax.jit(jax.value_and_grad(loss))(params), jax.value_and_grad(ref)(params)
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-3),
                         g, g_ref)


def test_dmd_gradient_with_respect_to_x_is_grad_over_numel(tiny):
  module, params = tiny
  ctx, neg, noise = _inputs(module.config)
  x = noise * 0.5
  rng = jax.random.key(1)
  kwargs = dict(teacher=module, teacher_params=params, critic=module,
                critic_params=jax.tree_util.tree_map(lambda a: a * 1.01, params), rng=rng)
  g = jax.grad(lambda x: losses.dmd_loss(x, ctx, neg, **kwargs)[0])(x)
  # The same quantities by hand: the timestep, the noised input, CFG, the normaliser.
  k_t, k_eps = jax.random.split(rng)
  t = losses.sample_timesteps(k_t, B)
  s = (t / 1000.0).reshape(B, 1, 1, 1, 1)
  x_t = (1 - s) * x + s * jax.random.normal(k_eps, x.shape)
  x0 = lambda p, c: x_t - s * module.apply({"params": p}, x_t, t, c)
  real = x0(params, ctx) + 3.0 * (x0(params, ctx) - x0(params, neg))
  fake = x0(kwargs["critic_params"], ctx)
  norm = jnp.mean(jnp.abs(x - real), axis=(1, 2, 3, 4)).reshape(B, 1, 1, 1, 1)
  np.testing.assert_allclose(g, (fake - real) / norm / x.size, rtol=2e-4, atol=1e-9)
  # And on a case small enough to check by eye: grad/numel exactly.
  xs = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  gr = jnp.array([[0.5, -1.0], [2.0, 0.0]])
  np.testing.assert_allclose(jax.grad(losses.dmd_loss_from_gradient)(xs, gr), gr / 4)
  assert float(losses.dmd_loss_from_gradient(xs, gr)) == pytest.approx(0.5 * (0.25 + 1 + 4) / 4)


def test_dmd_normaliser_by_hand():
  x = jnp.array([[[1.0, -1.0]], [[2.0, 2.0]]])
  real = jnp.array([[[0.0, 1.0]], [[1.0, 0.0]]])
  fake = jnp.array([[[0.5, 0.0]], [[1.0, 3.0]]])
  grad, norm = losses.dmd_gradient(x, real, fake)
  np.testing.assert_allclose(norm, [1.5, 1.5])  # mean |x - real| per sample
  np.testing.assert_allclose(grad, (fake - real) / 1.5)


def test_timesteps_are_shifted_and_clamped():
  t = losses.sample_timesteps(jax.random.key(0), 20000)
  assert float(t.min()) >= 20.0 and float(t.max()) <= 980.0
  # shift 5 puts most mass at high t: P(t > 500) = P(s' > 0.5) = P(s > 1/6) = 5/6.
  assert float(jnp.mean(t > 500.0)) == pytest.approx(5 / 6, abs=0.01)


class _ConstV:
  def __init__(self, v):
    self.v = v

  def apply(self, variables, x, t, ctx, **kw):
    del variables, t, ctx, kw
    return jnp.full(x.shape, self.v)


def test_critic_loss_by_hand():
  x = jnp.ones((2, 3, 2, 2, 1))
  rng = jax.random.key(4)
  loss, _ = losses.critic_loss(x, None, critic=_ConstV(0.25), critic_params=None, rng=rng)
  eps = jax.random.normal(jax.random.split(rng)[1], x.shape)
  assert float(loss) == pytest.approx(float(jnp.mean((0.25 - (eps - 1.0))**2)), rel=1e-6)


def _sign_disc(x, t):
  """Logit j = 10 (j + 1) sign(mean(x) - 5): +10(j+1) near 10, -10(j+1) near 0."""
  del t
  sign = jnp.sign(jnp.mean(x, axis=(1, 2, 3, 4)) - 5.0)
  return 10.0 * sign[:, None] * jnp.arange(1.0, 4.0)[None, :]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_asd_losses_by_hand(n):
  x_n = jnp.zeros((2, 3, 4, 4, 2))
  x_n1 = jnp.full((2, 3, 4, 4, 2), 10.0)
  rng = jax.random.key(0)
  kw = dict(t_min=20.0, t_max=20.0)  # s = 0.02: the noise never flips the sign
  d_loss, m = losses.asd_discriminator_loss(_sign_disc, x_n, x_n1, jnp.int32(n), rng, **kw)
  gap = 20.0 * n  # f(x_n1) - f(x_n) with D_n = logit n - 1
  assert float(m["disc_reg"]) == 0.0  # sigma-perturbations do not move a sign
  assert float(d_loss) == pytest.approx(math.log1p(math.exp(-gap)), rel=1e-5, abs=1e-12)
  assert float(m["disc_logit_gap"]) == pytest.approx(gap)
  g_loss, _ = losses.asd_generator_loss(_sign_disc, x_n, x_n1, jnp.int32(n), rng, **kw)
  assert float(g_loss) == pytest.approx(gap + math.log1p(math.exp(-gap)), rel=1e-6)
  # Constant logits: both sides tie, softplus(0) = log 2, no penalty.
  const = lambda x, t: jnp.ones((x.shape[0], 3))
  assert float(losses.asd_discriminator_loss(const, x_n, x_n1, jnp.int32(n), rng)[0]) == \
      pytest.approx(math.log(2.0))


@pytest.mark.parametrize("r_form,scale", [("eq6", 1.0), ("sigma", 1.0 / 0.05)])
def test_r1_r2_penalty_by_hand(r_form, scale):
  """A linear discriminator f = c * sum(x): the penalty is 0.5 c^2 sigma^2 (sum eps')^2 + ...
  (Eq. 6), and 1 / sigma^2 = 400 times that with Self Forcing's division by sigma."""
  x = jnp.zeros((1, 3, 2, 2, 1))
  lin = lambda x, t: jnp.broadcast_to(2.0 * jnp.sum(x, axis=(1, 2, 3, 4))[:, None], (x.shape[0], 3))
  rng = jax.random.key(5)
  _, m = losses.asd_discriminator_loss(lin, x, x, jnp.int32(1), rng, r_sigma=0.05, r_form=r_form)
  k_ra, k_rb = jax.random.split(rng, 3)[1:]
  e_a = jnp.sum(jax.random.normal(k_ra, x.shape))
  e_b = jnp.sum(jax.random.normal(k_rb, x.shape))
  expect = 0.5 * scale**2 * ((2.0 * 0.05 * e_a)**2 + (2.0 * 0.05 * e_b)**2)
  assert float(m["disc_reg"]) == pytest.approx(float(expect), rel=1e-4)
  with pytest.raises(ValueError, match="r_form"):
    losses.asd_discriminator_loss(lin, x, x, jnp.int32(1), rng, r_form="R1")


def test_asd_timestep_laws():
  ts = (1000.0, 937.5, 833.3333, 625.0)
  k = jax.random.key(0)
  sched = np.asarray(losses.asd_timesteps(k, 4000, t_law="schedule", timesteps=ts))
  assert set(np.unique(sched).tolist()) == set(np.float32(ts).tolist())  # Algorithm 1, line 7
  uni = np.asarray(losses.asd_timesteps(k, 4000, t_law="uniform", t_min=20.0, t_max=980.0))
  assert uni.min() >= 20.0 and uni.max() <= 980.0 and abs(uni.mean() - 500.0) < 15.0
  dmd = losses.asd_timesteps(k, 4000, t_law="dmd")
  np.testing.assert_array_equal(dmd, losses.sample_timesteps(k, 4000))
  assert float(jnp.mean(dmd)) > 700.0  # shift 5 pushes DMD's law to high noise
  with pytest.raises(ValueError, match="t_law"):
    losses.asd_timesteps(k, 4, t_law="beta")


def test_pair_auc_and_its_chance_band():
  assert losses.pair_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
  assert losses.pair_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
  assert losses.pair_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
  assert losses.pair_auc([1.0, 3.0], [2.0, 0.0]) == 0.75  # 3 of the 4 pairs ranked right
  assert losses.auc_chance_band(64, 64) == pytest.approx(2.0 * math.sqrt(129 / (12 * 64 * 64)))


def test_no_gradient_reaches_the_n_plus_one_step_sample(tiny):
  module, params = tiny
  ctx, _, noise = _inputs(module.config)
  heads_cfg = disc.DiscConfig(dim=module.config.dim, taps=(0, 1), num_queries=2, num_heads=2,
                              mlp_dim=16, num_logits=3)
  heads = disc.DiscHeads(heads_cfg)
  hp = disc.init_heads(heads_cfg, jax.random.key(2))
  disc_fn = lambda x, t: disc.discriminator_logits(module, params, heads, hp, x, t,
                                                   jnp.concatenate([ctx] * (x.shape[0] // B)))
  x_n, x_n1 = noise, noise * 0.5 + 0.3
  g_n, g_n1 = jax.grad(lambda a, b: losses.asd_generator_loss(
      disc_fn, a, b, jnp.int32(2), jax.random.key(0))[0], argnums=(0, 1))(x_n, x_n1)
  assert float(jnp.abs(g_n).max()) > 0
  assert float(jnp.abs(g_n1).max()) == 0.0
  # The D loss differentiates the heads only; the samples get nothing.
  g_x = jax.grad(lambda a: losses.asd_discriminator_loss(
      disc_fn, a, x_n1, jnp.int32(1), jax.random.key(0))[0])(x_n)
  assert float(jnp.abs(g_x).max()) == 0.0
  with pytest.raises(ValueError, match="hidden states"):
    heads.apply({"params": hp}, jnp.zeros((3, 1, 2, module.config.dim)))


class _EchoStudent:
  """Predicts v = 0 (so x0 = x) and records the per-frame timesteps it was given."""
  seen = []

  def apply(self, variables, x, t, ctx, causal=False):
    assert causal and t.shape == x.shape[:2]
    _EchoStudent.seen.append(t)
    return jnp.zeros_like(x)


def test_ode_regression_by_hand():
  noisy_one = jax.random.normal(jax.random.key(0), (2, 6, 2, 2, 1))
  noisy = jnp.stack([noisy_one] * 4, axis=1)  # every stored timestep holds the same latents
  clean = jnp.ones((2, 6, 2, 2, 1))
  ts = jnp.array(TS)
  loss, _ = losses.ode_regression_loss(_EchoStudent(), None, noisy, clean, ts, None,
                                       jax.random.key(1))
  assert float(loss) == pytest.approx(float(jnp.mean((noisy_one - 1.0)**2)), rel=1e-6)
  t = _EchoStudent.seen[-1]
  assert set(np.unique(np.asarray(t)).tolist()) <= set(np.asarray(ts).tolist())
  assert (t[:, 0] == t[:, 2]).all() and (t[:, 3] == t[:, 5]).all()  # one timestep per chunk
