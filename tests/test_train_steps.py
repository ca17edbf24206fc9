"""The pure train steps: what each one changes, the alpha = 0 baseline, EMA, non-finite skips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.diffusion import few_step_schedule
from asd_jax.models import disc, wan
from asd_jax.train import state as st
from asd_jax.train.steps import StepConfig, make_steps, run_cycle

B, LATENT = 1, (6, 4, 4, 16)


@pytest.fixture(scope="module")
def world():
  cfg = wan.WanConfig.preset("tiny")
  model = wan.WanModel(cfg)
  teacher_params = wan.init_params(cfg, jax.random.key(0))
  student = jax.tree_util.tree_map(lambda a: a * 0.9, teacher_params)
  hcfg = disc.DiscConfig(dim=cfg.dim, taps=(0, 1), num_queries=2, num_heads=2, mlp_dim=16,
                         num_logits=3)
  k1, k2 = jax.random.split(jax.random.key(1))
  ctx = jax.random.normal(k1, (B, 5, cfg.text_dim))
  batch = {"context": ctx, "neg_context": jax.random.normal(k2, (B, 5, cfg.text_dim))}
  return model, teacher_params, student, hcfg, batch


def _setup(world, alpha, with_heads=True):
  model, teacher_params, student, hcfg, batch = world
  heads = disc.DiscHeads(hcfg) if with_heads else None
  tx = st.make_optimizer(1e-3)
  steps = make_steps(generator=model, critic=model, teacher=model, teacher_params=teacher_params,
                     heads=heads, gen_tx=tx, critic_tx=tx, heads_tx=tx,
                     cfg=StepConfig(timesteps=few_step_schedule(4), latent_shape=LATENT,
                                    alpha=alpha, ema_start=1))
  state = st.init_state(student, teacher_params, disc.init_heads(hcfg, jax.random.key(3)),
                        gen_tx=tx, critic_tx=tx, heads_tx=tx, rng=jax.random.key(42))
  jitted = {k: jax.jit(f) for k, f in steps.items()}
  return jitted, state, batch


# Compiling a step takes most of these tests' time: two setups serve every test.
@pytest.fixture(scope="module")
def sf(world):
  return _setup(world, alpha=0.0, with_heads=False)


@pytest.fixture(scope="module")
def asd(world):
  return _setup(world, alpha=0.5, with_heads=True)


def _cycles(steps, state, batch, ratio, k):
  batches = {n: [batch] * c for n, c in zip(("generator", "critic", "disc"), ratio)}
  for _ in range(k):
    state, metrics = run_cycle(steps, state, batches, ratio)
  return state, metrics


def _equal(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                         jax.tree_util.tree_leaves(b)))


def test_discriminator_step_changes_only_the_heads(asd):
  steps, state, batch = asd
  new, metrics = steps["disc"](state, batch, jnp.int32(0))
  assert not _equal(new.heads, state.heads)
  assert not _equal(new.heads_opt, state.heads_opt)
  for field in ("generator", "generator_ema", "critic", "gen_opt", "critic_opt", "step"):
    assert _equal(getattr(new, field), getattr(state, field)), field
  assert 1 <= int(metrics["disc_n"]) <= 3 and np.isfinite(float(metrics["disc_loss"]))


def test_critic_step_changes_only_the_critic(sf):
  steps, state, batch = sf
  new, _ = steps["critic"](state, batch, jnp.int32(0))
  assert not _equal(new.critic, state.critic)
  for field in ("generator", "generator_ema", "heads", "gen_opt", "heads_opt", "step"):
    assert _equal(getattr(new, field), getattr(state, field)), field


@pytest.mark.slow  # suite budget (the default suite stays under 10 minutes on 2 cores)
def test_alpha_zero_is_exactly_the_self_forcing_baseline(world, sf, asd):
  """The ASD run's steps with alpha = 0 (heads built, discriminator steps interleaved) train the
  generator and critic exactly as the Self Forcing baseline's steps (no heads, no discriminator).
  """
  k = 2
  sf_steps, state, batch = sf
  asd0_steps, asd0_state, _ = _setup(world, alpha=0.0, with_heads=True)
  # Neither the critic step nor the discriminator step reads alpha: the compiled ones are reused.
  asd0_steps = dict(asd0_steps, critic=sf_steps["critic"], disc=asd[0]["disc"])
  assert _equal(asd0_state.generator, state.generator) and _equal(asd0_state.critic, state.critic)
  base, _ = _cycles(sf_steps, state, batch, (1, 2, 0), k)
  asd0, metrics = _cycles(asd0_steps, asd0_state, batch, (1, 2, 1), k)
  assert _equal(base.generator, asd0.generator) and _equal(base.critic, asd0.critic)
  assert _equal(base.generator_ema, asd0.generator_ema)
  assert not _equal(asd0.heads, asd0_state.heads)  # the discriminator did train
  assert "disc_loss" in metrics
  # ...while alpha > 0 does change the generator (the test can fail).
  asd_steps, asd_state, _ = asd
  full, metrics = _cycles(asd_steps, asd_state, batch, (1, 2, 1), k)
  assert not _equal(base.generator, full.generator)
  assert "generator/asd_loss" in metrics and int(full.step) == k


def test_ema_follows_the_generator_until_its_start(sf):
  steps, state, batch = sf  # ema_start = 1
  s1, _ = steps["generator"](state, batch)  # step 0 < start: the EMA is the generator
  assert _equal(s1.generator_ema, s1.generator)
  s2, _ = steps["generator"](s1, batch)  # step 1 >= start: averaging begins
  expect = jax.tree_util.tree_map(lambda e, p: 0.99 * e + 0.01 * p, s1.generator_ema,
                                  s2.generator)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         s2.generator_ema, expect)


@pytest.mark.slow  # suite budget; test_train_infra.py::test_non_finite_guard covers the guard
def test_non_finite_updates_are_skipped_and_counted(asd):
  steps, state, batch = asd
  bad = {k: v.at[0, 0, 0].set(jnp.nan) for k, v in batch.items()}
  new, metrics = steps["generator"](state, bad)
  assert float(metrics["nonfinite"]) == 1.0 and int(new.skipped) == 1
  assert _equal(new.generator, state.generator) and _equal(new.gen_opt, state.gen_opt)
  assert not np.isfinite(float(metrics["generator_loss"]))  # reported, never zeroed
  new, metrics = steps["critic"](new, bad, jnp.int32(0))
  assert int(new.skipped) == 2 and _equal(new.critic, state.critic)
