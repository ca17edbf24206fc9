"""Tests of the training infrastructure: sharding, checkpoints, metrics, launch scripts.

The 8-device checks (meshes, sharded init, sharded jit, sharded checkpoints) run in a subprocess
(tests/train_infra_multidevice.py): the fake device count must be set before JAX starts.
"""

import importlib.machinery
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.train import checkpoint, metrics, sharding

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.update(extra)
  return env


def _state(step: int):
  return {"w": jnp.full((3, 4), float(step), jnp.float32),
          "key": jax.random.fold_in(jax.random.key(0), step),
          "count": jnp.int32(step),
          "host": np.arange(5, dtype=np.int64) * step}


def _assert_state_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert x.dtype == y.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


# ----------------------------------------------------------------------------------------------
# Sharding.


def test_multidevice_sharding_and_checkpoints(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "train_infra_multidevice.py"),
                         str(tmp_path / "ckpt")], env=_env(), capture_output=True, text=True,
                        timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and "ALL PASSED" in proc.stdout, out[-6000:]
  for name in ["make_mesh", "rules", "wan_init (8, 1, 1)", "wan_init (2, 4, 1)",
               "wan_init (1, 4, 2)", "jit_step", "opt_state", "checkpoint_sharded"]:
    assert f"PASS {name}" in proc.stdout


def test_make_mesh_one_device():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="needs 2 devices but there are 1"):
    sharding.make_mesh((2, 1, 1))
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))


_DIST_VARS = ("ASD_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
              "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.mark.parametrize("env, expected, kwargs", [
    ({}, None, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, None, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
      "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, "slurm", {}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"}, "coordinator", {"num_processes": 2, "process_id": 1}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu", {}),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None, None),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "openmpi", {}),
    ({"ASD_JAX_DISTRIBUTED": "1"}, "forced", {}),
    ({"ASD_JAX_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "w0,w1"}, None, None),
])
def test_initialize_distributed(monkeypatch, env, expected, kwargs):
  for var in _DIST_VARS:
    monkeypatch.delenv(var, raising=False)
  for var, value in env.items():
    monkeypatch.setenv(var, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert sharding.detect_multiprocess() == expected
  assert sharding.initialize_distributed() == (expected is not None)
  assert calls == ([] if kwargs is None else [kwargs])
  assert sharding.is_main_process()


# ----------------------------------------------------------------------------------------------
# Checkpoints (one device; the sharded ones are in the multi-device script).


def test_checkpoint_interval_keep_latest_restore(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2,
                               handle_sigterm=False) as ckpt:
    assert ckpt.latest_step() is None
    saved = [ckpt.save(step, _state(step), {"step": step, "loss": np.float32(0.5)})
             for step in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, _state(7), {"step": 7}, force=True)
    assert not ckpt.save(7, _state(7), force=True)  # already there: not written twice
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    with pytest.raises(TypeError, match="not JSON-serialisable"):
      ckpt.save(8, _state(8), {"bad": object()})
  abstract = jax.eval_shape(lambda: _state(0))
  abstract["host"] = np.zeros(5, np.int64)
  with checkpoint.Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
    assert ckpt.all_steps() == [6, 7]
    state, meta = ckpt.restore(abstract)
    _assert_state_equal(state, _state(7))
    assert meta == {"step": 7}
    state, meta = ckpt.restore(abstract, step=6)
    _assert_state_equal(state, _state(6))
    assert meta == {"step": 6, "loss": 0.5}
    with pytest.raises(FileNotFoundError, match="available: \\[6, 7\\]"):
      ckpt.restore(abstract, step=2)
    with pytest.raises(ValueError, match="does not fit"):
      ckpt.restore({**abstract, "w": jax.ShapeDtypeStruct((3, 5), jnp.float32)})
    # The restored key draws what the saved one drew.
    np.testing.assert_array_equal(jax.random.normal(state["key"], (3,)),
                                  jax.random.normal(_state(6)["key"], (3,)))


def test_restore_or_init(tmp_path):
  calls = []

  def init():
    calls.append(1)
    return _state(0)

  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1, handle_sigterm=False) as ckpt:
    state, meta, step = ckpt.restore_or_init(init)
    assert step is None and meta == {} and calls == [1]
    ckpt.save(3, _state(3), {"config": {"lr": 2e-6}})
  with checkpoint.Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
    abstract = {**jax.eval_shape(lambda: _state(0)), "host": np.zeros(5, np.int64)}
    state, meta, step = ckpt.restore_or_init(init, abstract)
  assert step == 3 and meta == {"config": {"lr": 2e-6}} and calls == [1]  # init not run
  _assert_state_equal(state, _state(3))


def test_checkpoint_optimizer_and_dataclass_state(tmp_path):
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class State:
    params: dict
    opt: object
    rngs: jax.Array

  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(1e-3, b1=0.0))
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  opt = tx.update(params, tx.init(params), params)[1]
  state = State(params, opt, jax.random.split(jax.random.key(1), 3))
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1, handle_sigterm=False) as ckpt:
    ckpt.save(1, state)
  with checkpoint.Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
    restored, _ = ckpt.restore(jax.eval_shape(lambda: state))
    assert isinstance(restored, State)
    _assert_state_equal(restored, state)
    wrong = State({"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}, opt,
                  jax.eval_shape(lambda: jax.random.split(jax.random.key(1), 5)))
    with pytest.raises(ValueError, match=r"params/w: stored \[2, 3\], requested \[3, 2\]"):
      ckpt.restore(wrong)


def test_incomplete_save_is_ignored(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1, handle_sigterm=False) as ckpt:
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
  # What a save killed half-way leaves: a temporary directory that was never renamed.
  partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000123456"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  abstract = jax.eval_shape(lambda: _state(0))
  abstract["host"] = np.zeros(5, np.int64)
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1, handle_sigterm=False) as ckpt:
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    state, _ = ckpt.restore(abstract)
    _assert_state_equal(state, _state(2))
    ckpt.save(3, _state(3))  # the step can be written again
  assert not partial.exists()
  with checkpoint.Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
    assert ckpt.latest_step() == 3


_KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from asd_jax.train import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1], save_interval_steps=1, handle_sigterm=False)
    ckpt.save(1, {"w": jnp.full((4, 1024, 1024), 1.0)}, {"step": 1})
    ckpt.wait_until_finished()
    ckpt.save(2, {"w": jnp.full((4, 1024, 1024), 2.0)}, {"step": 2})   # asynchronous
    print(sorted(os.listdir(sys.argv[1])), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)                                # mid-write
""")


def test_save_killed_half_way_keeps_last_good_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(tmp_path)], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert "'2.orbax-checkpoint-tmp" in proc.stdout  # killed while step 2 was being written
  with checkpoint.Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
    assert ckpt.all_steps() == [1], proc.stdout
    state, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((4, 1024, 1024), jnp.float32)})
  assert meta == {"step": 1}
  assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))  # the debris is cleaned up
  assert float(jnp.min(state["w"])) == float(jnp.max(state["w"])) == 1.0


def test_sigterm_saves_at_step_boundary_in_process(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=100) as ckpt:
    stopped_at = None
    for step in range(1, 10):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
        assert not ckpt.should_stop()
      ckpt.save(step, _state(step), {"step": step})
      if ckpt.should_stop():
        stopped_at = step
        break
    assert stopped_at == 3 and ckpt.all_steps() == [3]
  assert signal.getsignal(signal.SIGTERM) == before


_TRAIN_LOOP = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from asd_jax.train import checkpoint
    with checkpoint.Checkpointer(sys.argv[1], save_interval_steps=1000) as ckpt:
      for step in range(1, 100000):
        state = {"w": jnp.full((8,), float(step))}
        time.sleep(0.02)                                  # a training step
        ckpt.save(step, state, {"step": step})
        print("step", step, flush=True)
        if ckpt.should_stop():
          print("stopped", step, flush=True)
          break
""")


def test_sigterm_clean_exit_subprocess(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _TRAIN_LOOP, str(tmp_path)], env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("step 5"):
        proc.send_signal(signal.SIGTERM)
        break
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  stopped = int(out.split("stopped")[1].split()[0])
  assert stopped >= 5
  with checkpoint.Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
    assert ckpt.all_steps() == [stopped]
    state, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((8,), jnp.float32)})
  assert meta == {"step": stopped} and float(state["w"][0]) == stopped


# ----------------------------------------------------------------------------------------------
# Metrics.


def _strict_json(line):
  def no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return json.loads(line, parse_constant=no_constants)


def test_metrics_writer_jsonl(tmp_path):
  with metrics.MetricsWriter(tmp_path, is_main=True, total_steps=3, tensorboard=False,
                             progress_keys=("loss",)) as writer:
    rec = writer.write(0, {"loss": jnp.float32(0.25), "gen": {"grad_norm": np.float64(2.0),
                                                              "lr": 2e-6},
                           "skipped": True, "vector": jnp.ones(3)})
    writer.write(1, {"loss": jnp.float32(jnp.nan), "gen": {"grad_norm": jnp.inf, "lr": -math.inf}})
  assert rec["loss"] == 0.25 and "vector" not in rec
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  first, second = [_strict_json(line) for line in lines]
  assert first["step"] == 0 and isinstance(first["time"], float)
  assert first["gen/grad_norm"] == 2.0 and first["gen/lr"] == 2e-6 and first["skipped"] == 1.0
  assert second["loss"] == "nan" and second["gen/grad_norm"] == "inf"
  assert second["gen/lr"] == "-inf"
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert math.isnan(records[1]["loss"]) and records[1]["gen/lr"] == -math.inf
  with pytest.raises(ValueError, match="reserved"):
    metrics.MetricsWriter(tmp_path / "x", is_main=True, tensorboard=False,
                          progress=False).write(0, {"step": 1.0})


def test_metrics_writer_other_process_and_resume(tmp_path):
  silent = metrics.MetricsWriter(tmp_path / "other", is_main=False)
  assert silent.write(0, {"loss": 1.0}) is None
  silent.close()
  assert not (tmp_path / "other").exists()
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "time": 0.0, "loss": s}) + "\n"
                          for s in range(5)) + '{"step": 5, "lo')  # cut short by a kill
  with metrics.MetricsWriter(tmp_path, is_main=True, start_step=3, tensorboard=False,
                             progress=False) as writer:
    writer.write(3, {"loss": 30.0})
  assert [r["step"] for r in metrics.read_jsonl(path)] == [0, 1, 2, 3]
  assert metrics.read_jsonl(path)[-1]["loss"] == 30.0


def test_metrics_writer_tensorboard_when_importable(tmp_path, monkeypatch):
  events = []

  class SummaryWriter:
    def __init__(self, logdir, purge_step=None):
      events.append(("open", logdir, purge_step))

    def add_scalar(self, name, value, global_step):
      events.append((name, value, global_step))

    def flush(self):
      pass

    def close(self):
      events.append(("close",))

  fake = types.ModuleType("tensorboardX")
  fake.SummaryWriter = SummaryWriter
  fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
  monkeypatch.setitem(sys.modules, "tensorboardX", fake)
  with metrics.MetricsWriter(tmp_path, is_main=True, start_step=7, progress=False) as writer:
    writer.write(7, {"loss": 1.5, "d": {"acc": 0.5}})
  assert events == [("open", str(tmp_path / "tensorboard"), 7), ("loss", 1.5, 7),
                    ("d/acc", 0.5, 7), ("close",)]


def test_non_finite_guard():
  guard = metrics.NonFiniteGuard(max_consecutive=3)
  assert guard.update(0, {"loss": 1.0})
  assert not guard.update(1, {"loss": jnp.nan})
  assert not guard.update(2, {"loss": 1.0, "grad_norm": jnp.inf})
  assert guard.update(3, {"loss": 1.0})  # a finite step resets the run
  assert guard.consecutive == 0 and guard.num_skipped == 2
  assert not guard.update(4, {"loss": 2.0}, finite=False)  # the step's own verdict
  assert not guard.update(5, {"loss": jnp.nan})
  with pytest.raises(metrics.NonFiniteError, match="3 consecutive") as err:
    guard.update(6, {"loss": jnp.nan, "gen": {"grad_norm": 7.0}})
  message = str(err.value)
  assert "step 4: loss=2" in message and "step 6: loss=nan, gen/grad_norm=7" in message
  assert "step 3" not in message and "5 skipped in all" in message
  assert guard.state() == {"num_skipped": 5, "consecutive": 3}
  resumed = metrics.NonFiniteGuard(3, keys=("loss",))
  resumed.load_state({"num_skipped": 5, "consecutive": 0})
  assert resumed.update(7, {"loss": 1.0, "unchecked": jnp.nan}) and resumed.num_skipped == 5


# ----------------------------------------------------------------------------------------------
# Launch scripts.


@pytest.fixture
def no_cloud_path(tmp_path):
  """A PATH whose gcloud/sbatch/srun record any call: a dry run must not make one."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "sbatch", "srun", "scontrol"):
    script = bin_dir / tool
    script.write_text(f"#!/bin/sh\necho called >> {tmp_path}/{tool}.called\nexit 1\n")
    script.chmod(0o755)
  return f"{bin_dir}:{os.environ['PATH']}"


def _launch(script, args, path, **env):
  return subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, PATH=path, **env))


def test_tpu_pod_dry_run(no_cloud_path, tmp_path):
  args = ["--name=asd-v5p", "--zone=us-east5-a", "--project=proj", "--accelerator_type=v5p-128",
          "--config=configs/asd.py:tiny", "--workdir=gs://bucket/run1", "--spot", "--",
          "--config.total_steps=3000", "--config.name=a b"]
  for extra, env in (["--dry_run"], {}), ([], {"DRY_RUN": "1"}):
    proc = _launch("tpu_pod.sh", args[:-3] + extra + args[-3:], no_cloud_path, **env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ("+ gcloud compute tpus tpu-vm create asd-v5p --zone=us-east5-a --project=proj "
            "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot") in out
    assert "gcloud compute tpus tpu-vm scp" in out and "pip install -e asd_jax" in out
    train = [line for line in out.splitlines() if "-m asd_jax.train" in line]
    assert len(train) == 1
    assert "--worker=all" in train[0] and "ASD_JAX_DISTRIBUTED=1" in train[0]
    assert ("python3 -m asd_jax.train --config=configs/asd.py:tiny --workdir=gs://bucket/run1 "
            "--config.total_steps=3000 --config.name=a\\ b") in train[0]
  assert not list(tmp_path.glob("*.called"))
  proc = _launch("tpu_pod.sh", ["--dry_run", "--name=x", "--zone=z", "--config=c",
                                "--workdir=gs://b", "--skip_create", "--skip_install"],
                 no_cloud_path)
  assert "create" not in proc.stdout and "scp" not in proc.stdout
  assert proc.stdout.count("--worker=all") == 1
  proc = _launch("tpu_pod.sh", ["--dry_run", "--name=x"], no_cloud_path)
  assert proc.returncode == 2 and "--zone is required" in proc.stderr
  proc = _launch("tpu_pod.sh", ["--help"], no_cloud_path)
  assert proc.returncode == 0 and "Usage: launch/tpu_pod.sh" in proc.stdout


def test_gpu_multinode_dry_run(no_cloud_path, tmp_path):
  args = ["--nodes=4", "--gpus_per_node=8", "--config=configs/asd.py", "--workdir=/shared/run1",
          "--partition=h100", "--time=48:00:00", "--dry_run", "--", "--config.total_steps=3000"]
  proc = _launch("gpu_multinode.sh", args, no_cloud_path)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for expected in ["+ sbatch", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
                   "#SBATCH --gpus-per-node=8", "#SBATCH --partition=h100",
                   "#SBATCH --time=48:00:00", "export JAX_COORDINATOR_ADDRESS=",
                   "export JAX_NUM_PROCESSES=32", "JAX_PROCESS_ID=$SLURM_PROCID",
                   "JAX_LOCAL_DEVICE_IDS=$gpu", "srun --nodes=4 --ntasks-per-node=8",
                   "python -m asd_jax.train --config=configs/asd.py --workdir=/shared/run1 "
                   "--config.total_steps=3000"]:
    assert expected in out, expected
  proc = _launch("gpu_multinode.sh", args[:-3] + ["--srun"], no_cloud_path, DRY_RUN="1")
  assert proc.returncode == 0 and "sbatch" not in proc.stdout
  assert "srun --nodes=4" in proc.stdout and "-m asd_jax.train" in proc.stdout
  assert not list(tmp_path.glob("*.called"))
  proc = _launch("gpu_multinode.sh", ["--config=c", "--workdir=w"], no_cloud_path)
  assert proc.returncode == 2 and "--nodes is required" in proc.stderr
  proc = _launch("gpu_multinode.sh", ["-h"], no_cloud_path)
  assert proc.returncode == 0 and "Usage: launch/gpu_multinode.sh" in proc.stdout
