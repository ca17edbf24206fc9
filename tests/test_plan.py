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

import jax
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
  r = _plan(*SAMPLE, "--only=sampler", "--offload_dit", f"--json={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(out.read_text())
  assert [p["name"] for p in data["programs"]] == ["sampler"]
  assert data["programs"][0]["analytic_flops"] > 0 and data["programs"][0]["xla_flops"] > 0
  # The VAE's params stay on the device while the sampler runs: counted in the verdict.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from asd_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  vae_bytes = sum(np.prod(a.shape) * a.dtype.itemsize
                  for a in jax.tree.leaves(vae_lib.abstract_params(vae_lib.VAEConfig())))
  p = data["programs"][0]
  assert p["resident"] == vae_bytes > 0
  assert p["headroom"] == p["hbm"] - p["memory"]["total"] - vae_bytes
  assert data["sample_flags"] == ["--num_frames=21", "--height=32", "--width=32",
                                  "--dtype=float32", "--offload_dit"]


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
    (["--target=v5p-8", "--config.batch_size=4", "--ode_pairs", "--ode_steps=0"], "--steps"),
    # 700 is not a point of the 48-step grid with shift 5: the builder refuses it too.
    (["--target=v5p-8", "--config.batch_size=4", "--ode_pairs",
      "--ode_training_timesteps=1000,700"], "grid"),
    (["--target=v5p-8", "--config.batch_size=4", "--ode_pairs", "--sample"], "one of them"),
    (["--target=v5p-8", "--config.batch_size=4", "--kernel_efficiency=0"], "(0, 1]"),
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


def test_ode_pair_solve(tmp_path):
  """The builder's teacher solve (`trajectories.solve_pairs`) at the builder's flags."""
  out = tmp_path / "ode.json"
  flags_ = ["--ode_frames=3", "--ode_height=8", "--ode_width=8", "--ode_steps=8", "--ode_shift=1",
            "--ode_training_timesteps=1000,750", "--ode_batch_size=2"]
  r = _plan("--config=configs/ode_init.py:tiny", "--config.mesh_shape=(1,1,4)", "--target=v5p-8",
            "--ode_pairs", *flags_, "--kernel_efficiency=0.25", f"--json={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["kind"] == "ode_pairs" and data["fits"]
  assert data["ode_pairs_flags"] == [f.replace("--ode_", "--") for f in flags_]
  (p,) = data["programs"]
  assert p["name"] == "ode_pairs_solve" and p["analytic_flops"] > 0 and p["xla_flops"] > 0
  assert p["breakdown"]["kernel_efficiency"] == 0.25  # the attention kernels' assumed share
  # Outputs: noisy [B, K, F, H, W, C] and clean [B, F, H, W, C] float32 (TPU tiles may pad them).
  logical = 4 * 2 * (2 + 1) * 3 * 8 * 8 * 16
  assert p["memory"]["output"] >= logical
  # Arguments: the teacher's params, float32 unless --ode_param_dtype says otherwise, and the
  # prompt and negative contexts [B, text_len, text_dim].
  import numpy as np  # pylint: disable=g-import-not-at-top
  from asd_jax.models import wan  # pylint: disable=g-import-not-at-top
  from asd_jax.train.programs import wan_config  # pylint: disable=g-import-not-at-top
  import run_configs  # pylint: disable=g-import-not-at-top
  c = run_configs.config("ode_init")
  cfg = wan_config(c.models.teacher, "bfloat16", "none").replace(param_dtype="float32")
  param_bytes = sum(np.prod(a.shape) * 4 for a in jax.tree.leaves(wan.abstract_params(cfg)))
  assert p["memory"]["argument"] >= param_bytes + 2 * 4 * 2 * c.data.text_len * cfg.text_dim


def test_training_programs_carry_the_tpu_options_on_tpu_only():
  assert targets.training_compiler_options(targets.devices("v5p-8")) == \
      targets.TPU_TRAINING_OPTIONS
  assert targets.training_compiler_options(jax.devices("cpu")) is None


@pytest.mark.slow
def test_fsdp_generator_step_at_the_real_width_compiles_for_v5p():
  """libtpu 0.0.52 aborted the whole process on this program (2 layers of the real widths at
  832x480x81 under the config's FSDP mesh) until the trainer's programs carried
  TPU_TRAINING_OPTIONS; about 5 minutes to compile on two cores."""
  import run_configs  # pylint: disable=g-import-not-at-top
  from asd_jax import plan  # pylint: disable=g-import-not-at-top
  c = run_configs.config("asd", arg=None)
  for name in ("student", "critic", "teacher"):
    c.models[name].num_layers = 2
  c.asd.taps = (0, 1)
  target, mesh, world = plan.resolve(c, "v5p-8")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  (entry,) = plan.plan_training(c, target, mesh, world, only=["generator"])
  assert entry.error is None and entry.fits, entry.error_detail
