"""Every run-config field is checked before anything is built, and the message names the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import run_configs

from asd_jax.toy import config as toy_config
from asd_jax.train import config as run_config
from asd_jax.train import loop

REPO = Path(__file__).resolve().parents[1]


def _tiny(stage="asd", **overrides):
  c = run_config.apply_arg(run_config.base_config(stage), "tiny")
  if stage != "asd":
    c.asd.alpha = 0.0
  if stage == "dmd":
    c.update_ratio = (1, 1, 0)
  c.progress = False
  return run_configs.override(c, **overrides)


# (field, bad value, the message's rule); every message also names the field and the value.
BAD_FIELDS = [
    ("optim.gen_lr", -1e-4, "learning rate > 0"),
    ("optim.gen_lr", 0.0, "learning rate > 0"),
    ("optim.critic_lr", -4e-7, "learning rate > 0"),
    ("optim.weight_decay", -1.0, ">= 0"),
    ("optim.b1", 1.0, "in [0, 1)"),
    ("optim.b2", 1.5, "in [0, 1)"),
    ("optim.b2", -0.1, "in [0, 1)"),
    ("optim.eps", 0.0, "> 0"),
    ("optim.clip_norm", -5.0, "> 0"),
    ("ema.decay", 1.5, "in [0, 1]"),
    ("ema.decay", -0.5, "in [0, 1]"),
    ("ema.start", -1, ">= 0"),
    ("dmd.guidance", -3.0, ">= 0"),
    ("dmd.t_min", -1.0, "in [0, 1000]"),
    ("dmd.t_max", 1001.0, "in [0, 1000]"),
    ("shift", -5.0, "> 0"),
    ("shift", 0.0, "> 0"),
    ("pretrain.shift", 0.0, "> 0"),
    ("pretrain.t_max", 2000.0, "in [0, 1000]"),
    ("pretrain.cfg_dropout", 1.5, "in [0, 1]"),
    ("chunk_frames", 0, ">= 1"),
    ("latent.frames", 0, ">= 1"),
    ("latent.height", -4, ">= 1"),
    ("log_every", 0, ">= 1"),
    ("max_nonfinite", 0, ">= 1"),
    ("checkpoint.every", 0, ">= 1"),
    ("checkpoint.keep", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("device_batch", -1, ">= 0"),
    ("total_steps", 0, ">= 1"),
    ("update_ratio", (0, 4, 1), "generator >= 1"),
    ("update_ratio", (1, -1, 1), "critic >= 0"),
    ("asd.alpha", -0.01, ">= 0"),
    ("asd.r_lambda", -600.0, ">= 0"),
    ("asd.r_sigma", 0.0, "> 0"),
    ("asd.taps", (), "non-empty"),
    ("asd.taps", (1, 1), "distinct"),
    ("asd.num_queries", 0, ">= 1"),
    ("asd.mlp_dim", 0, ">= 1"),
    ("ode.steps", 0, ">= 1"),
    ("ode.guidance", -1.0, ">= 0"),
    ("ode.pool", -2, ">= 0"),
    ("data.synthetic_prompts", 0, ">= 1"),
    ("data.text_len", 0, ">= 1"),
    ("mesh_shape", (-1, -1, 1), "one of them -1"),
    ("mesh_shape", (0, 1, 1), "each >= 1"),
    ("remat", "most", "one of"),
    ("dtype", "float8", "one of"),
]


@pytest.mark.parametrize("field,value,rule", BAD_FIELDS,
                         ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS])
def test_a_bad_field_is_refused_with_its_config_name(field, value, rule):
  assert run_config.validate(_tiny()) is None  # the tiny config itself passes
  with pytest.raises(ValueError) as e:
    run_config.validate(_tiny(**{field: value}))
  msg = str(e.value)
  assert msg.startswith(f"{field} must be"), msg
  assert rule in msg and repr(value) in msg and f"--config.{field}=" in msg, msg


@pytest.mark.parametrize("overrides,msg", [
    ({"dmd.t_min": 980.0, "dmd.t_max": 20.0}, "dmd.t_min 980.0 must be below dmd.t_max 20.0"),
    ({"pretrain.t_min": 500.0, "pretrain.t_max": 500.0}, "pretrain.t_min 500.0 must be below"),
    ({"latent.frames": 7}, "latent.frames 7 is not a multiple of chunk_frames 3"),
    ({"latent.width": 5}, "latent.height and latent.width (4x5) must be even"),
    ({"asd.taps": (0, 2)}, "asd.taps (0, 2) index blocks outside the critic's 2"),
    ({"models.critic.num_heads": 5}, "models.critic: dim 48 is not divisible by num_heads 5"),
    ({"models.student.preset": "huge"}, "models.student: Unknown Wan preset"),
    ({"timesteps": (1000.0, 0.0)}, "timesteps has timesteps outside (0, 1000]"),
])
def test_values_that_contradict_each_other_are_refused(overrides, msg):
  with pytest.raises(ValueError) as e:
    run_config.validate(_tiny(**overrides))
  assert msg in str(e.value)


def test_every_shipped_config_passes():
  for name in ("asd", "self_forcing", "ode_init"):
    for arg in (None, "tiny", "teacher=1.3b"):
      c = loop_config(name, arg)
      run_config.validate(c)
  for arg in (None, "quick", "analytic", "ablation", "ablation,quick"):
    toy_config.validate(toy_config.get_config(arg))


def loop_config(name, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _converted(path: Path, kind: str, config: dict) -> Path:
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"kind": kind, "config": config, "source": {}}))
  return path


def test_init_directories_must_hold_a_wan_dit_of_the_configured_architecture(tmp_path):
  from asd_jax.models import wan  # pylint: disable=g-import-not-at-top
  tiny = wan.WanConfig.preset("tiny", text_dim=32).to_dict()
  vae = _converted(tmp_path / "vae", "vae", {"base_dim": 96, "remat_policy": "none"})
  with pytest.raises(ValueError) as e:
    run_config.validate(_tiny(**{"init.student": str(vae)}))
  assert str(e.value).startswith(f"init.student = {vae} holds a 'vae' checkpoint, not a Wan DiT")
  release = tmp_path / "release"
  _converted(release / "dit", "wan", tiny)
  with pytest.raises(ValueError, match=f"give {release / 'dit'}"):
    run_config.validate(_tiny(**{"init.teacher": str(release)}))
  wide = _converted(tmp_path / "wide", "wan", dict(tiny, num_layers=3))
  # The critic starts from init.teacher when init.critic is empty: the message names that field.
  with pytest.raises(ValueError, match=r"init.teacher = .* holds a model with num_layers 3; "
                                       r"models.critic asks for num_layers 2"):
    run_config.validate(_tiny(**{"init.teacher": str(wide), "models.teacher.num_layers": 3}))
  good = _converted(tmp_path / "good", "wan", tiny)
  run_config.validate(_tiny(**{"init.student": str(good), "init.teacher": str(good)}))
  with pytest.raises(FileNotFoundError, match="init.critic = /nonexistent is not a directory"):
    run_config.validate(_tiny(**{"init.critic": "/nonexistent"}))


def test_datasets_are_checked_against_the_config(tmp_path):
  from asd_jax.data.ode_pairs import MARKER  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match="data.prompts = /nonexistent is not a directory"):
    run_config.validate(_tiny(**{"data.prompts": "/nonexistent"}))
  pairs = tmp_path / "pairs"
  pairs.mkdir()
  (pairs / MARKER).write_text(json.dumps({"timesteps": [1000.0, 750.0, 500.0, 250.0],
                                          "latent_shape": [6, 4, 4, 16]}))
  c = _tiny("ode_init", **{"data.ode_pairs": str(pairs)})
  with pytest.raises(ValueError, match=r"data.ode_pairs = .* holds timesteps \[1000.0, 750.0, "
                                       r"500.0, 250.0\]; the config trains on \[1000.0, 937.5"):
    run_config.validate(c)
  with pytest.raises(ValueError, match="data.ode_pairs is read by stage 'ode_init' only"):
    run_config.validate(_tiny("dmd", **{"data.ode_pairs": str(pairs)}))


def test_batch_must_split_over_the_mesh_batch_axes():
  mesh = jax.sharding.AbstractMesh((2, 2, 3), ("data", "fsdp", "tensor"))  # batch -> data x fsdp
  run_config.check_mesh(_tiny(batch_size=8), mesh)
  run_config.check_mesh(_tiny(batch_size=8, device_batch=2), mesh)
  with pytest.raises(ValueError, match=r"batch_size 6 is not a multiple of the 4 devices"):
    run_config.check_mesh(_tiny(batch_size=6), mesh)
  with pytest.raises(ValueError, match=r"batch_size 4 is not a multiple of device_batch 2 x the "
                                       r"4 devices"):
    run_config.check_mesh(_tiny(batch_size=4, device_batch=2), mesh)
  with pytest.raises(ValueError, match=r"batch_size 6 is not a multiple of the 4 devices"):
    run_config.validate(_tiny(batch_size=6), mesh=mesh)


@pytest.mark.parametrize("overrides,msg", [
    ({"pipeline.distill.gen_lr": -1e-4}, "pipeline.distill.gen_lr must be a learning rate > 0"),
    ({"pipeline.teacher_net.total_steps": 0}, "pipeline.teacher_net.total_steps must be"),
    ({"pipeline.ode_init.b1": 1.0}, "pipeline.ode_init.b1 must be in [0, 1)"),
    ({"pipeline.eval_samples": 0}, "pipeline.eval_samples must be an integer >= 1"),
    ({"pipeline.runs": ("asd@-1",)}, "pipeline.runs: unknown run 'asd@-1'"),
    ({"pipeline.teacher": "exact"}, "pipeline.teacher must be 'trained' or 'analytic'"),
    ({"toy.sigma_d": 0.0}, "toy.sigma_d must be a number > 0"),
    ({"toy.modes_per_class": 3}, "toy.modes_per_class must be an even integer"),
    ({"log_every": 0}, "log_every must be an integer >= 1"),
    ({"checkpoint.every": 0}, "checkpoint.every must be an integer >= 1"),
])
def test_the_toy_pipeline_refuses_a_bad_field_before_any_stage(tmp_path, overrides, msg):
  from asd_jax.toy import pipeline  # pylint: disable=g-import-not-at-top
  c = toy_config.get_config("quick")
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError) as e:
    pipeline.run(c, tmp_path / "run")
  assert msg in str(e.value)
  assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize("overrides,msg", [
    ({"log_every": 0}, "log_every must be an integer >= 1"),
    ({"chunk_frames": 0}, "chunk_frames must be an integer >= 1"),
    ({"checkpoint.every": 0}, "checkpoint.every must be an integer >= 1"),
    ({"checkpoint.keep": 0}, "checkpoint.keep must be an integer >= 1"),
])
def test_train_refuses_before_creating_anything(tmp_path, overrides, msg):
  """log_every = 0 and chunk_frames = 0 used to divide by zero after compiling."""
  with pytest.raises(ValueError) as e:
    loop.train(_tiny(**overrides), tmp_path / "run")
  assert msg in str(e.value)
  assert not (tmp_path / "run").exists()


def test_the_cli_names_the_field_and_fails(tmp_path):
  r = subprocess.run([sys.executable, "-m", "asd_jax.train", "--config=configs/asd.py:tiny",
                      f"--workdir={tmp_path / 'run'}", "--config.checkpoint.every=0"],
                     cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0
  assert "checkpoint.every must be an integer >= 1" in r.stderr, r.stderr[-2000:]
  assert "save_interval_steps" not in r.stderr
  assert not (tmp_path / "run").exists()
