"""The toy-world pipeline on the real training code: analytic teacher, pretraining step, sampler
steps, stage configs, and a whole (very short) run of `configs/toy.py`."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.diffusion import warp_timesteps
from asd_jax.distill import losses
from asd_jax.models import wan
from asd_jax.sampling import generate
from asd_jax.toy import ablation
from asd_jax.toy import evaluate as ev
from asd_jax.toy import pipeline
from asd_jax.toy.teacher import AnalyticTeacher, class_of_context
from asd_jax.toy.world import ToyConfig, ToyWorld
from asd_jax.train import loop
from asd_jax.train.state import init_state, make_optimizer
from asd_jax.train.steps import make_pretrain_step

ROOT = Path(__file__).resolve().parents[1]
SMALL = ToyConfig(frames=6, height=4, width=4, channels=4, text_tokens=3, text_dim=32)


def toy_config(arg=None):
  spec = importlib.util.spec_from_file_location("toy_config", ROOT / "configs" / "toy.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def world():
  return ToyWorld(SMALL)


def test_analytic_teacher_is_the_exact_velocity_per_row(world):
  cls = jnp.array([0, 3, 1, 2])
  x, _ = world.sample(jax.random.key(0), cls)
  t = jnp.array([900.0, 500.0, 100.0, 20.0])
  ctx = jnp.asarray(world.text)[cls]
  ctx = ctx.at[2].set(0.0)  # row 2 unconditional (the null text)
  found, null = class_of_context(world, ctx)
  np.testing.assert_array_equal(np.asarray(found)[[0, 1, 3]], [0, 3, 2])
  np.testing.assert_array_equal(null, [False, False, True, False])
  v = AnalyticTeacher(world).apply({"params": {}}, x, t, ctx)
  for i in (0, 1, 3):
    np.testing.assert_allclose(v[i], world.velocity(x[i:i + 1], t[i:i + 1], cls[i:i + 1])[0],
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v[2], world.velocity(x[2:3], t[2:3], None)[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="text embeddings"):
    class_of_context(world, ctx[:, :2])
  with pytest.raises(ValueError, match="one timestep per row"):
    AnalyticTeacher(world).apply({}, x, jnp.ones((4, 6)), ctx)


@pytest.mark.slow  # suite budget (the default suite stays under 10 minutes on 2 cores)
def test_pretrain_step_is_flow_matching_with_context_dropout():
  cfg = wan.WanConfig.preset("tiny", in_channels=4, out_channels=4, dtype="float32")
  model = wan.WanModel(cfg)
  params = wan.init_params(cfg, jax.random.key(0))
  tx = make_optimizer(1e-3, b1=0.9)
  state = init_state(params, {}, {}, gen_tx=tx, critic_tx=tx, heads_tx=tx, rng=jax.random.key(1))
  k = jax.random.split(jax.random.key(2), 3)
  batch = {"clean": jax.random.normal(k[0], (2, 6, 4, 4, 4)),
           "context": jax.random.normal(k[1], (2, 3, 32)),
           "neg_context": jnp.zeros((2, 3, 32))}
  kw = dict(shift=1.0, t_min=1.0, t_max=1000.0)
  # Dropout 1: every row trains on the negative context; 0: on its own. The step's loss is the
  # critic's flow-matching loss under the step's key.
  for p_drop, ctx in ((1.0, batch["neg_context"]), (0.0, batch["context"])):
    step = jax.jit(make_pretrain_step(model=model, tx=tx, cfg_dropout=p_drop, **kw))
    new, metrics = step(state, batch)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
    _, k_loss = jax.random.split(key)
    want, _ = losses.critic_loss(batch["clean"], ctx, critic=model, critic_params=params,
                                 rng=k_loss, **kw)
    np.testing.assert_allclose(metrics["flow_loss"], want, rtol=1e-6)
    assert int(new.step) == 1 and float(metrics["nonfinite"]) == 0.0
  # Training lowers the loss on a fixed batch.
  step = jax.jit(make_pretrain_step(model=model, tx=tx, cfg_dropout=0.0, **kw))
  first = None
  s = state
  for _ in range(30):
    s, m = step(s.replace(step=jnp.zeros((), jnp.int32)), batch)  # same noise every time
    first = float(m["flow_loss"]) if first is None else first
  assert float(m["flow_loss"]) < 0.8 * first


@pytest.mark.slow  # suite budget (the default suite stays under 10 minutes on 2 cores)
def test_generate_returns_the_x0_of_every_step(world):
  cfg = wan.WanConfig.preset("tiny", in_channels=4, out_channels=4, dtype="float32")
  module, params = wan.WanModel(cfg), wan.init_params(cfg, jax.random.key(0))
  ctx = jnp.asarray(world.text[:2])
  noise = jax.random.normal(jax.random.key(1), (2,) + SMALL.shape)
  first, later = (1000.0, 900.0, 600.0), (1000.0, 600.0)
  kw = dict(first_chunk_timesteps=first, later_chunk_timesteps=later, rng=jax.random.key(2))
  plain = generate(module, params, ctx, noise, **kw)
  out, steps_first, steps_later = generate(module, params, ctx, noise, return_steps=True, **kw)
  np.testing.assert_array_equal(out, plain)
  assert steps_first.shape == (3, 2, 3, 4, 4, 4) and steps_later.shape == (2, 2, 3, 4, 4, 4)
  np.testing.assert_array_equal(steps_first[-1], out[:, :3])
  np.testing.assert_array_equal(steps_later[-1], out[:, 3:])
  assert not np.allclose(steps_first[0], steps_first[-1])


def test_schedules_and_run_names():
  ts = warp_timesteps((1000.0, 750.0, 500.0, 250.0), 5.0)
  names = [name for name, _, _ in ev.schedules(ts)]
  assert names == ["4", "2", "2*", "1", "1*", "2/spread", "2*/spread"]
  table = {name: (first, later) for name, first, later in ev.schedules(ts)}
  assert table["1*"] == (ts, ts[:1]) and table["2"] == (ts[:2], ts[:2])
  assert table["2*/spread"] == (ts, (ts[0], ts[2]))
  assert pipeline.run_alpha("dmd", 0.01) == ("dmd", 0.0)
  assert pipeline.run_alpha("asd", 0.01) == ("asd", 0.01)
  assert pipeline.run_alpha("asd@0.3", 0.01) == ("asd", 0.3)
  assert pipeline.run_alpha("asd@0", 0.01) == ("asd", 0.0)  # the ablation's paired baseline
  for bad in ("asd@-1", "asd@x", "gan"):
    with pytest.raises(ValueError, match="unknown run"):
      pipeline.run_alpha(bad, 0.01)


def test_stage_configs_validate_and_wire_the_teacher():
  c = toy_config()
  pre = pipeline.stage_config(c, "pretrain")
  assert pre.stage == "pretrain" and pre.models.student == c.models.teacher
  assert pre.total_steps == c.pipeline.teacher_net.total_steps
  loop.validate(pre)
  asd = pipeline.stage_config(c, "asd", teacher_dir="/t", student_dir="/s", alpha=0.01)
  assert (asd.init.teacher, asd.init.critic, asd.init.student) == ("/t", "/t", "/s")
  c_an = toy_config("analytic")
  ode = pipeline.stage_config(c_an, "ode_init", teacher_dir="/t")
  assert ode.models.teacher.preset == "analytic" and ode.init.teacher == ""
  assert ode.init.student == "/t"  # the causal student starts from the pretrained net
  c_an.pipeline.ode_init.from_teacher = False
  assert pipeline.stage_config(c_an, "ode_init", teacher_dir="/t").init.student == ""
  c_an.pipeline.ode_init.from_teacher = True
  c_an.models.student.num_layers = 2
  with pytest.raises(ValueError, match="from_teacher needs"):
    pipeline.stage_config(c_an, "ode_init", teacher_dir="/t")
  c_an.models.student.num_layers = c_an.models.teacher.num_layers
  bad = pipeline.stage_config(c, "ode_init")
  bad.latent.frames = 6
  with pytest.raises(ValueError, match="toy world"):
    loop.validate(bad)
  bad = pipeline.stage_config(c_an, "ode_init")
  bad.data.toy = False
  with pytest.raises(ValueError, match="analytic teacher exists for the toy world only"):
    loop.validate(bad)


def test_ode_pool_solves_a_fixed_set_once_and_draws_from_it(world):
  """ode.pool = N: N examples solved once (example e with prompt e mod K), then drawn like a
  built pair dataset; the rows equal a direct solve of their example, and fresh mode differs."""
  from asd_jax.data import ode_pairs  # pylint: disable=g-import-not-at-top
  from asd_jax.data.prompts import batch_indices  # pylint: disable=g-import-not-at-top
  from asd_jax.train import data  # pylint: disable=g-import-not-at-top
  c = toy_config("analytic")
  c.toy = dict(c.toy.to_dict(), frames=6, height=4, width=4, text_tokens=3)
  c.stage, c.batch_size, c.ode.steps, c.ode.pool = "ode_init", 4, 4, 6
  timesteps = tuple(warp_timesteps(c.timesteps, c.shift))
  teacher = AnalyticTeacher(world)
  latent = (6, 4, 4, 4)
  source = data.make_source(c, teacher=teacher, teacher_params={}, timesteps=timesteps,
                            latent=latent, world=world)
  grid = ode_pairs.ode_timesteps(c.ode.steps, c.shift, c.timesteps)
  text = np.asarray(world.text, np.float32)
  seen = set()
  for step in range(3):  # 12 rows from a pool of 6: every example comes back
    batch = source(step)
    rows = batch_indices(6, seed=c.seed, step=step, process_index=0, process_count=1,
                         per_process_batch=4)
    seen.update(rows.tolist())
    k = len(text)
    noisy, clean = ode_pairs.generate_pairs(
        teacher, {}, rows, text[rows % k], np.broadcast_to(world.null_text, (4,) + text.shape[1:]),
        seed=c.seed, latent_shape=latent, timesteps=grid, guidance_scale=c.ode.guidance)
    np.testing.assert_allclose(batch["noisy"], noisy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["clean"], clean, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch["context"], text[rows % k])
  assert seen == set(range(6))
  c.ode.pool = 0  # fresh pairs: examples 4..7 at step 1, none of them in the pool
  fresh = data.make_source(c, teacher=teacher, teacher_params={}, timesteps=timesteps,
                           latent=latent, world=world)(1)
  assert not np.any([np.allclose(fresh["clean"][i], source(1)["clean"][j])
                     for i in range(4) for j in range(4)])
  c.ode.pool = -1
  with pytest.raises(ValueError, match="ode.pool must be >= 0"):
    data.make_source(c, teacher=teacher, teacher_params={}, timesteps=timesteps, latent=latent,
                     world=world)


def test_toy_config_budgets():
  """The quick start's budgets are the default; 'ablation' is the set-up of docs/toy_results.md."""
  quick, abl = toy_config(), toy_config("ablation")
  assert quick.pipeline.teacher == "trained" and abl.pipeline.teacher == "analytic"
  assert (quick.pipeline.teacher_net.total_steps, quick.pipeline.ode_init.total_steps,
          quick.ode.pool, quick.pipeline.distill.total_steps) == (600, 150, 256, 100)
  assert (abl.pipeline.teacher_net.total_steps, abl.pipeline.ode_init.total_steps, abl.ode.pool,
          abl.pipeline.distill.total_steps, abl.ema.start, abl.pipeline.eval_samples) == (
              600, 200, 0, 100, 100, 64)
  smoke = toy_config("ablation,quick")
  assert smoke.pipeline.teacher == "analytic" and smoke.pipeline.distill.total_steps == 5
  with pytest.raises(ValueError, match="unknown config argument"):
    toy_config("fast")


def _shrink(c):
  """configs/toy.py:quick on a smaller world and model: the whole pipeline in a test."""
  c.toy.frames, c.toy.height, c.toy.width = 6, 4, 4
  c.latent.frames, c.latent.height, c.latent.width = 6, 4, 4
  for name in ("student", "teacher", "critic"):
    c.models[name].dim, c.models[name].ffn_dim, c.models[name].num_layers = 16, 32, 2
    c.models[name].freq_dim = 16
  c.asd.taps, c.asd.mlp_dim = (0, 1), 16
  c.pipeline.teacher_net.total_steps = 4
  c.pipeline.ode_init.total_steps = 2
  c.pipeline.distill.total_steps = 2
  c.pipeline.distill.batch_size = 2
  c.pipeline.eval_samples = 4
  c.pipeline.teacher_steps = 4
  c.ode.steps = 4
  c.progress = False
  c.pipeline.runs = ("dmd", "asd@0", "asd")
  c.asd.alpha = 0.5
  c.asd.auc_every = 1
  c.asd.auc_samples = 2
  return c


@pytest.mark.slow  # about 160 s on two busy cores; the stages' pieces are tested above
def test_the_toy_pipeline_runs_every_stage_and_resumes_nothing_twice(tmp_path):
  c = _shrink(toy_config("quick"))
  logs = []
  work = tmp_path / "seed_0"  # the ablation's layout
  results = pipeline.run(c, work, log=logs.append)
  for stage in ("teacher", "ode_init", "dmd", "asd@0", "asd"):
    assert (work / stage / "export" / "config.json").exists(), stage
  saved = json.loads((work / "results.json").read_text())
  assert set(saved["runs"]) == {"ode_init", "dmd", "asd@0", "asd"}
  for name, r in results["runs"].items():
    assert set(r["schedules"]) == {"4", "2", "2*", "1", "1*", "2/spread", "2*/spread"}
    for m in r["schedules"].values():
      assert 0 <= m["precision"] <= 1 and 0 < m["coverage"] <= 1
      assert np.isfinite(m["nll_per_dim"]) and np.isfinite(m["energy_distance"])
    assert np.asarray(r["step_similarity"]["first"]).shape == (4, 4)
    np.testing.assert_allclose(np.diag(r["step_similarity"]["later"]), 1.0, rtol=1e-6)
    assert len(r["adjacent"]["n_to_next"]) == 3 and len(r["adjacent"]["n_to_teacher"]) == 4
  # The baseline's discriminator never ran; the ASD run logged its logit gap every step.
  assert np.all(np.isnan(results["runs"]["dmd"]["training"]["disc_logit_gap"]))
  assert np.all(np.isfinite(results["runs"]["asd"]["training"]["disc_logit_gap"]))
  for run in ("asd@0", "asd"):  # the held-out AUC per n, every update (auc_every = 1)
    auc = results["runs"][run]["training"]["disc_auc"]
    assert sorted(auc) == ["1", "2", "3"] and auc["1"]["step"] == [1, 2]
    assert all(0.0 <= a <= 1.0 for v in auc.values() for a in v["auc"])
  assert len(results["runs"]["asd"]["training"]["dmd_loss"]) == 2
  # The true data scores as the floor it is.
  assert results["data"]["precision"] > 0.9 and results["data"]["temporal_consistency"] == 1.0
  report = (work / "report.md").read_text()
  assert "asd @ 1*" in report and "true data (floor)" in report
  # A second call finds every stage done and only evaluates again.
  logs.clear()
  again = pipeline.run(c, work, log=logs.append)
  assert sum("done before" in line for line in logs) == 5
  assert again["runs"]["dmd"]["schedules"] == results["runs"]["dmd"]["schedules"]

  # The ablation's aggregation, report, plots and videos on these (two identical "seeds").
  s = ablation.summarise([results, again])
  assert s["schedules"]["dmd"]["1*"]["nll_per_dim"] == [results["runs"]["dmd"]["schedules"]["1*"]
                                                        ["nll_per_dim"]] * 2
  d = s["paired"]["asd"]["nll_per_dim@1"]  # arm - baseline, seed by seed
  base = results["runs"]["asd@0"]["schedules"]["1"]["nll_per_dim"]
  arm = results["runs"]["asd"]["schedules"]["1"]["nll_per_dim"]
  assert d["diffs"] == [arm - base] * 2 and d["n"] == 2
  text = ablation.render(s)
  assert "## Primary endpoint" in text and "| asd | NLL/dim @ 1 |" in text
  pngs = ablation.plots(s, tmp_path)
  assert [p.name for p in pngs] == ["step_similarity.png", "alpha_sweep.png", "training.png"]
  assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
  mp4s = ablation.videos(c, tmp_path, tmp_path / "videos", 0, ["dmd", "asd"])
  assert sorted(p.name for p in mp4s) == sorted(
      ["data.mp4"] + [f"{r}_{k}.mp4" for r in ("dmd", "asd") for k in ("4", "2star", "1star")])
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  reader = imageio_ffmpeg.read_frames(str(tmp_path / "videos" / "dmd_1star.mp4"))
  meta = next(reader)
  frames = list(reader)
  assert meta["size"] == (4 * 4 * 8, 4 * 8) and len(frames) == 6
