"""`python -m asd_jax.plan` on tiny configs, compiled for a TPU slice that is not attached.

The full-size plans (1.3B/14B at 832x480x81) are benchmarks run by hand; here the CLI runs end to
end on the tiny configs: every program listed with its figures, the JSON written, and the exit
status 0 (fits), 3 (does not fit) and 2 (bad input, before any compile).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asd_jax import targets

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/asd.py:tiny", "--config.batch_size=2", "--config.mesh_shape=(2,1,2)"]


def _plan(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "asd_jax.plan", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # suite budget (the default suite stays under 10 minutes on 2 cores)
def test_asd_stage_on_a_tpu_slice_lists_every_program_and_writes_json(tmp_path):
  out = tmp_path / "plan.json"
  r = _plan(*TINY, "--target=v5p-8", f"--json={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ("state_init", "generator", "critic", "discriminator"):
    assert f"\n{name} " in r.stdout, r.stdout
  assert "fits" in r.stdout and "loop body once" in r.stdout
  data = json.loads(out.read_text())
  assert data["fits"] and data["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert data["target"]["name"] == "v5p-8"
  programs = {p["name"]: p for p in data["programs"]}
  assert set(programs) == {"state_init", "generator", "critic", "discriminator"}
  for name, p in programs.items():
    m = p["memory"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"], name
    assert 0 < m["total"] < p["hbm"] and p["headroom"] == p["hbm"] - m["total"], name
  for name in ("generator", "critic", "discriminator"):
    assert programs[name]["xla_flops"] > 0 and programs[name]["xla_seconds"] > 0  # cost model
    m = programs[name]["memory"]
    assert m["alias"] > 0, name  # the state is donated
    assert programs[name]["analytic_flops"] > 0, name
  assert not list(tmp_path.glob(".plan.json.*"))  # written through a temporary file


SAMPLE = ["--config=configs/asd.py:tiny", "--target=v5e-1", "--sample", "--num_frames=21",
          "--height=32", "--width=32", "--dtype=float32"]


def test_sampler(tmp_path):
  out = tmp_path / "sample.json"
  r = _plan(*SAMPLE, "--only=sampler", f"--json={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(out.read_text())
  assert [p["name"] for p in data["programs"]] == ["sampler"]
  assert data["programs"][0]["analytic_flops"] > 0 and data["programs"][0]["xla_flops"] > 0
  assert data["sample_flags"] == ["--num_frames=21", "--height=32", "--width=32",
                                  "--dtype=float32"]


@pytest.mark.slow
def test_streaming_decode():
  """The Wan VAE's decoder takes about two minutes to compile for a TPU, whatever the size."""
  r = _plan(*SAMPLE, "--only=vae_decode_first_chunk,vae_decode_chunk", timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "\nvae_decode_first_chunk " in r.stdout and "\nvae_decode_chunk " in r.stdout


def test_exit_3_when_a_program_does_not_fit(tmp_path):
  out = tmp_path / "plan.json"
  # A millionth of the chip's memory: the state alone is larger.
  r = _plan(*TINY, "--target=v5p-8", "--memory_fraction=0.000001", "--only=state_init",
            f"--json={out}")
  assert r.returncode == 3, r.stderr[-3000:]
  assert "DOES NOT FIT" in r.stdout
  data = json.loads(out.read_text())
  assert not data["fits"] and data["programs"][0]["headroom"] < 0


@pytest.mark.parametrize("args, message", [
    (["--target=v5p-7"], "v5p-8"),  # an unknown target: the valid ones are listed
    (["--target=v5p-8", "--config.mesh_shape=(3,1,1)"], "4 devices"),
    (["--target=v5p-8", "--config.batch_size=3", "--config.mesh_shape=(2,1,2)"], "multiple"),
    (["--target=v5p-8", "--config.latent.frames=7"], "chunk_frames"),  # fails validation
    (["--target=v5p-8", "--config.batch_size=4", "--only=sampler"], "state_init, generator"),
])
def test_bad_input_exits_2_before_compiling(args, message):
  r = _plan("--config=configs/asd.py:tiny", *args, timeout=120)
  assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  assert "compiling" not in r.stderr


def test_gpu_target():
  if not targets.has_cuda_plugin():
    pytest.skip('needs jax\'s CUDA plugin for a deviceless GPU compile: pip install -e ".[aot-gpu]"')
  r = _plan("--config=configs/asd.py:tiny", "--target=h100x1", "--only=state_init")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "\nstate_init " in r.stdout and "H100" in r.stdout


def test_gpu_training_steps_on_eight_gpus():
  """The rollout's cached attention under an 8-GPU mesh: cuDNN runs per shard (its partitioner
  refused queries and keys sharded differently) and dots compile without autotuning."""
  if not targets.has_cuda_plugin():
    pytest.skip('needs jax\'s CUDA plugin for a deviceless GPU compile: pip install -e ".[aot-gpu]"')
  r = _plan("--config=configs/asd.py:tiny", "--target=h100x8", "--config.batch_size=8",
            "--config.dtype=bfloat16", "--only=generator,discriminator")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "\ngenerator " in r.stdout and "\ndiscriminator " in r.stdout
