"""benchmarks/train_step.py and benchmarks/sampler.py: timed on the local CPU, or compiled for a TPU
that is not attached (no timing then), on tiny configs.

The default tests use the ODE-initialisation stage (one step) to stay within the suite's budget;
the ASD stage's three steps (the script's default config, `configs/asd.py:tiny`) take about a
minute of compiling on two cores for each mode and run under `-m slow`.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"),
    reason="libtpu is not installed (pip install libtpu): no TPU target can compile")
ODE = ["--config=configs/ode_init.py:tiny"]
ON_V5P = ["--target=v5p-8", "--config.mesh_shape=(1,1,-1)"]  # batch 1: the 4 chips on tensor


def _run(script, *args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _check_local(data, steps, per_cycle, repeats, peak):
  assert data["mode"] == "local" and data["timed"] is True
  assert data["device"]["backend"] == "cpu"
  assert list(data["steps"]) == steps
  for name, s in data["steps"].items():
    assert s["per_cycle"] == per_cycle[name], name
    assert len(s["all_seconds"]) == repeats and min(s["all_seconds"]) > 0, name
    assert s["seconds"] == statistics.median(s["all_seconds"]), name
    assert s["compile_seconds"] > 0, name
    assert s["xla_flops"] > 0 and s["analytic_flops"] > 0, name
    m = s["memory"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] > 0, name
    assert m["alias"] > 0, name  # the state is donated, as the trainer's steps donate it
    assert s["mfu"] == pytest.approx(s["analytic_flops"] / s["seconds"] / 1e12 / peak), name
  cycle = sum(per_cycle[n] * s["seconds"] for n, s in data["steps"].items())
  assert data["cycle"]["seconds"] == pytest.approx(cycle)


def _check_target(data, programs):
  assert data["mode"] == "deviceless" and data["timed"] is False
  assert "nothing ran" in data["timing"] and "steps" not in data
  assert data["target"]["name"] == "v5p-8" and data["fits"] is True
  got = {p["name"]: p for p in data["programs"]}
  assert list(got) == programs
  for name in programs:
    p = got[name]
    m = p["memory"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"], name
    assert 0 < m["total"] < p["hbm"] and p["headroom"] == p["hbm"] - m["total"], name
    if name != "state_init":
      assert p["xla_flops"] > 0 and p["xla_seconds"] > 0 and p["analytic_flops"] > 0, name
  return got


@pytest.mark.slow  # suite budget; test_sampler_for_a_tpu runs the --target path
@needs_libtpu
def test_train_step_locally_and_for_a_tpu_the_same_programs(tmp_path):
  out = tmp_path / "local.json"
  r = _run("train_step.py", *ODE, "--unroll_layers", "--repeats=2", "--peak_tflops=1",
           f"--json={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(r.stdout)
  assert json.loads(out.read_text()) == data and not list(tmp_path.glob(".local.json.*"))
  _check_local(data, ["ode_regression"], {"ode_regression": 1}, repeats=2, peak=1.0)
  step = data["steps"]["ode_regression"]
  # Unrolled, XLA counts every matmul the analytic counter counts (and the elementwise work,
  # norms, softmax on top): an analytic count above XLA's would be wrong.
  assert step["xla_flops"] >= step["analytic_flops"]
  assert data["config_values"]["stage"] == "ode_init"

  r = _run("train_step.py", *ODE, *ON_V5P, "--only=ode_regression")
  assert r.returncode == 0, r.stderr[-3000:]
  tpu = _check_target(json.loads(r.stdout), ["ode_regression"])
  # One source: both modes take the step and its analytic count from the planner's jobs.
  assert tpu["ode_regression"]["analytic_flops"] == step["analytic_flops"]


def test_train_step_bad_input_is_one_line_before_any_work():
  r = _run("train_step.py", *ODE, "--target=v9z-8")
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.startswith("error: ") and "v5p-8" in r.stderr, r.stderr
  r = _run("train_step.py", *ODE, "--config.mesh_shape=(3,1,1)")  # one CPU device here
  assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: "), r.stderr


SAMPLER = ["--target=v5e-1", "--preset=tiny", "--height=4", "--width=4", "--text_len=16",
           "--settings=1*"]


def _check_sampler(data, frames):
  assert data["mode"] == "deviceless" and data["timed"] is False and data["fits"] is True
  assert data["config"]["dtype"] == "bfloat16" and data["config"]["latent_frames"] == frames
  row = data["settings"]["1*"]
  assert (row["first_chunk_steps"], row["later_chunk_steps"]) == (4, 1)
  chunks = frames // 3
  assert row["dit_forwards"] == 4 + (chunks - 1) * (1 + 1)  # 4 on chunk 1, then a refill + 1 each
  for p in (row["video"], row["first_chunk"]):
    m = p["memory"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] > 0
    assert p["fits"] and p["xla_flops"] > 0 and p["xla_seconds"] > 0 and p["analytic_flops"] > 0
  return row


@needs_libtpu
def test_sampler_for_a_tpu(tmp_path):
  out = tmp_path / "sampler.json"
  r = _run("sampler.py", *SAMPLER, "--frames=3", "--vae=none", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(r.stdout)
  assert json.loads(out.read_text()) == data and not list(tmp_path.glob(".sampler.json.*"))
  assert "vae_decode" not in data
  row = _check_sampler(data, frames=3)
  assert row["first_chunk"] == row["video"]  # one chunk: the same program


def test_sampler_bad_input_before_any_compile():
  r = _run("sampler.py", "--target=v5e-1", "--preset=tiny", "--chunk_frames=4", "--frames=8")
  assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: "), r.stderr


@pytest.mark.slow
def test_train_step_default_config_every_asd_step_locally():
  r = _run("train_step.py", "--repeats=2", "--peak_tflops=1")  # configs/asd.py:tiny
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(r.stdout)
  _check_local(data, ["generator", "critic", "discriminator"],
               {"generator": 1, "critic": 4, "discriminator": 1}, repeats=2, peak=1.0)
  assert data["config"].endswith("configs/asd.py:tiny")


@pytest.mark.slow
@needs_libtpu
def test_train_step_every_asd_program_for_a_tpu():
  r = _run("train_step.py", *ON_V5P)
  assert r.returncode == 0, r.stderr[-3000:]
  got = _check_target(json.loads(r.stdout),
                      ["state_init", "generator", "critic", "discriminator"])
  for name in ("generator", "critic", "discriminator"):
    assert got[name]["memory"]["alias"] > 0, name  # the state is donated


@pytest.mark.slow
@needs_libtpu
def test_sampler_two_chunks_and_the_vae_for_a_tpu():
  """The Wan VAE's decoder takes minutes to compile for a TPU, whatever the size."""
  r = _run("sampler.py", *SAMPLER, "--frames=6", "--vae=wan2.1")
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(r.stdout)
  row = _check_sampler(data, frames=6)
  video, first = row["video"], row["first_chunk"]
  # The second chunk adds a refill and a forward against a 6-frame cache, and 3 latent frames.
  assert video["analytic_flops"] > first["analytic_flops"]
  assert video["memory"]["output"] > first["memory"]["output"]
  assert set(data["vae_decode"]) == {"vae_decode_first_chunk", "vae_decode_chunk"}
  assert all(p["fits"] and p["memory"]["total"] > 0 for p in data["vae_decode"].values())
