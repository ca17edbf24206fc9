"""The real `python -m asd_jax.train` as a person runs it: SIGTERM during ASD and ODE-init runs,
max_nonfinite stopping a diverging run, training from built datasets, and two processes on CPU
(jax.distributed with a local coordinator) equal to one.

All slow (each compiles and runs real training): `python -m pytest -m slow tests/test_cli_runs.py`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.update(extra)
  return env


def _train(args):
  return [sys.executable, "-m", "asd_jax.train", *args, "--config.progress=False"]


def _records(workdir):
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(workdir):
  ckpt = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


@pytest.mark.parametrize("config", ["configs/asd.py:tiny", "configs/ode_init.py:tiny"])
def test_sigterm_to_the_real_trainer_saves_and_the_rerun_resumes(tmp_path, config):
  """SIGTERM after the first logged step: the trainer saves at the step it reached and exits by
  itself (not killed by the signal); the same command then finishes the run, every step logged
  exactly once."""
  total = 40
  args = [f"--config={config}", f"--workdir={tmp_path}", f"--config.total_steps={total}",
          "--config.checkpoint.every=1000"]
  proc = subprocess.Popen(_train(args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 1200
  while not _records(tmp_path):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "no step logged in time"
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {err[-3000:]}"
  saved = _steps(tmp_path)
  logged = [r["step"] for r in _records(tmp_path)]
  assert saved and 1 <= saved[-1] < total, (saved, err[-2000:])
  assert logged[-1] >= saved[-1]  # records past the checkpoint are dropped on resume
  assert not (tmp_path / "export").exists()  # an interrupted run exports nothing
  r = subprocess.run(_train(args), cwd=REPO, env=_env(), capture_output=True, text=True,
                     timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert [rec["step"] for rec in _records(tmp_path)] == list(range(1, total + 1))
  assert (tmp_path / "export" / "config.json").is_file()


def test_max_nonfinite_stops_a_diverging_run(tmp_path):
  """A learning rate of 1e30 sends the parameters to inf after the first update; every later
  update is non-finite and skipped; the third in a row stops the run with a non-zero status."""
  r = subprocess.run(_train(["--config=configs/self_forcing.py:tiny", f"--workdir={tmp_path}",
                             "--config.total_steps=30", "--config.optim.gen_lr=1e30",
                             "--config.max_nonfinite=3", "--config.checkpoint.every=1000"]),
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
  assert r.returncode != 0
  assert "non-finite" in r.stderr.lower() or "nonfinite" in r.stderr.lower(), r.stderr[-3000:]
  records = _records(tmp_path)
  assert len(records) < 30 and records[-1]["skipped_total"] >= 3, records[-1:]
  assert not (tmp_path / "export").exists()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_cpu_equal_one_process(tmp_path):
  """jax.distributed.initialize with a local coordinator, one CPU device a process, CPU
  collectives (gloo): the same parameters as one process with two devices, metrics written once."""
  total = 1  # the script's run: one update-ratio cycle
  script = REPO / "tests" / "train_mesh_equivalence.py"

  def cmd(workdir, out):
    return [sys.executable, str(script), "dmd", "-1", "1", "1", str(workdir), str(out)]

  one = subprocess.run(cmd(tmp_path / "one", tmp_path / "one.npz"), cwd=REPO, env=_env(
      XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"),
      capture_output=True, text=True, timeout=1800)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(cmd(tmp_path / "two", tmp_path / f"two_{i}.npz"), cwd=REPO,
                            env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                     JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=1800) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a = dict(np.load(tmp_path / "one.npz"))
  for i in range(2):
    b = dict(np.load(tmp_path / f"two_{i}.npz"))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=1e-5, err_msg=k)
  assert [r["step"] for r in _records(tmp_path / "two")] == list(range(1, total + 1))


def test_training_from_built_datasets_through_the_cli(tmp_path):
  """data.prompts (python -m asd_jax.data.build's layout) and data.ode_pairs (python -m
  asd_jax.data.ode_pairs's) read by the real trainer; pairs made on other timesteps refused before
  anything is created."""
  from asd_jax.data import build, ode_pairs  # pylint: disable=g-import-not-at-top
  from test_ode_pairs import Encoder, TEXT_LEN, write_teacher  # pylint: disable=g-import-not-at-top
  prompts = build.build_dataset(["a cat surfing a wave", "a red fox in the snow", "a kite"],
                                tmp_path / "prompts", Encoder(), text_len=TEXT_LEN,
                                progress=False)
  teacher = write_teacher(tmp_path / "teacher")
  pairs = ode_pairs.build_ode_pairs(prompts, teacher, tmp_path / "pairs", num_examples=4,
                                    frames=6, height=4, width=4, batch_size=2,
                                    examples_per_shard=2, dtype="float32", progress=False)
  data = [f"--config.data.prompts={prompts}", f"--config.data.ode_pairs={pairs}"]
  r = subprocess.run(_train(["--config=configs/ode_init.py:tiny", f"--workdir={tmp_path / 'ode'}",
                             "--config.total_steps=2", "--config.export=False", *data]),
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert [rec["step"] for rec in _records(tmp_path / "ode")] == [1, 2]
  r = subprocess.run(_train(["--config=configs/self_forcing.py:tiny",
                             f"--workdir={tmp_path / 'dmd'}", "--config.total_steps=1",
                             "--config.export=False", f"--config.data.prompts={prompts}"]),
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(_records(tmp_path / "dmd")) == 1
  r = subprocess.run(_train(["--config=configs/ode_init.py:tiny", f"--workdir={tmp_path / 'bad'}",
                             "--config.shift=3.0", *data]),
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode != 0
  assert f"data.ode_pairs = {pairs} holds timesteps" in r.stderr, r.stderr[-3000:]
  assert not (tmp_path / "bad").exists()


def test_readme_toy_quick_command(tmp_path):
  """The README's main command, `python -m asd_jax.train --config=configs/toy.py:quick` (about 9
  minutes on two busy CPU cores): every stage exported, every setting scored, the report written."""
  r = subprocess.run(_train(["--config=configs/toy.py:quick", f"--workdir={tmp_path}"]),
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=3000)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["runs"]) == {"ode_init", "asd"}
  for m in results["runs"]["asd"]["schedules"].values():
    assert np.isfinite(m["nll_per_dim"]) and 0.0 <= m["coverage"] <= 1.0
  assert (tmp_path / "report.md").read_text().startswith("# Toy world")
  for stage in ("teacher", "ode_init", "asd"):
    assert (tmp_path / stage / "export" / "config.json").is_file(), stage
