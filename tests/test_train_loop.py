"""`python -m asd_jax.train` on the tiny configs: runs, resumes bit for bit, exports, validates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import run_configs

from asd_jax import pretrained
from asd_jax.train import loop

REPO = Path(__file__).resolve().parents[1]


_config = run_configs.config
_leaves = run_configs.leaves


@pytest.mark.slow  # suite budget (the default suite stays under 10 minutes on 2 cores)
def test_self_forcing_resume_is_bit_exact(tmp_path):
  """3 steps straight == 2 steps, stop, restart from the checkpoint, 1 more."""
  straight = loop.train(_config("self_forcing", total_steps=3, export=False), tmp_path / "a")
  loop.train(_config("self_forcing", total_steps=2, export=False), tmp_path / "b")
  resumed = loop.train(_config("self_forcing", total_steps=3, export=False), tmp_path / "b")
  for x, y in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(x, y)
  records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text()
             .splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r["generator_loss"]) for r in records)


@pytest.mark.slow  # suite budget (the default suite stays under 10 minutes on 2 cores)
def test_asd_tiny_runs_and_exports_a_loadable_generator(tmp_path):
  r = subprocess.run([sys.executable, "-m", "asd_jax.train", "--config=configs/asd.py:tiny",
                      f"--workdir={tmp_path}", "--config.total_steps=2",
                      "--config.progress=False"], cwd=REPO, capture_output=True, text=True,
                     timeout=600, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == 2
  for key in ("generator/dmd_loss", "generator/asd_loss", "critic_loss", "disc_loss",
              "disc_logit_gap", "generator/dmd_normaliser", "generator_grad_norm",
              "generator/latent_std", "perf/samples_per_s"):
    assert key in records[-1], key
  module, params = pretrained.load(tmp_path / "export")
  assert module.config.dim == 48
  assert params["blocks"]["ffn"]["fc1"]["kernel"].shape[0] == module.config.num_layers


def test_ode_init_tiny_runs(tmp_path):
  state = loop.train(_config("ode_init", total_steps=2, export=False), tmp_path)
  assert int(state.step) == 2 and int(state.skipped) == 0
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert np.isfinite(record["ode_loss"] if "ode_loss" in record else record["generator/ode_loss"])


@pytest.mark.parametrize("overrides,msg", [
    ({"latent.frames": 7}, "multiple of chunk_frames"),
    ({"update_ratio": (1, 4, 0)}, "needs discriminator updates"),
    ({"timesteps": (1000.0, 1000.0)}, "strictly decreasing"),
    ({"stage": "gan"}, "stage must be"),
    ({"init.teacher": "/nonexistent/teacher"}, "not a directory"),
    ({"asd.taps": (0, 5)}, "outside the critic"),
])
def test_bad_configs_are_rejected_before_anything_runs(overrides, msg):
  with pytest.raises((ValueError, FileNotFoundError), match=msg):
    loop.validate(_config("asd", **overrides))


def test_alpha_needs_the_asd_stage_and_unknown_arguments_fail():
  with pytest.raises(ValueError, match="use stage 'asd'"):
    loop.validate(_config("self_forcing", **{"asd.alpha": 0.1}))
  with pytest.raises(ValueError, match="unknown config argument"):
    _config("asd", arg="tiny,huge")
  real = _config("asd", arg="teacher=1.3b")
  assert real.models.teacher.preset == "1.3b" and real.batch_size == 64
  assert tuple(real.update_ratio) == (1, 4, 1) and real.asd.r_lambda == 600.0
