"""The real `python -m asd_jax.train` as a person runs it: SIGTERM during ASD and ODE-init runs,
and max_nonfinite stopping a diverging run.

All slow (each compiles and runs real training): `python -m pytest -m slow tests/test_cli_runs.py`.
"""

import json
import os
import signal
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
