"""Bad input refused up front, atomic writes, full disks, damaged checkpoints, readable errors.

Full disks are simulated with a small tmpfs where this process may mount one (root), else by
making the write fail as a full disk does; each test says which it uses.
"""

import errno
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax import cli
from asd_jax.io import atomic, orbax_io

REPO = Path(__file__).resolve().parents[1]


def _no_tracebacks(err):
  assert "Traceback" not in err, err


@pytest.fixture
def small_disk(tmp_path):
  """A 64 kB tmpfs (needs root and mount); skips where it cannot be made."""
  mnt = tmp_path / "small_disk"
  mnt.mkdir()
  if os.geteuid() != 0 or shutil.which("mount") is None:
    pytest.skip("mounting a tmpfs needs root")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                     capture_output=True, check=False)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------------------------
# asd_jax.io.atomic


def test_atomic_file_keeps_the_old_file_on_failure_and_leaves_no_temporary(tmp_path):
  dst = tmp_path / "report.md"
  atomic.write_text(dst, "old")
  with pytest.raises(RuntimeError):
    with atomic.atomic_file(dst) as tmp:
      tmp.write_text("half")
      raise RuntimeError("killed half-way")
  assert dst.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["report.md"]
  atomic.write_json(dst, {"a": 1})
  assert dst.read_text() == '{\n  "a": 1\n}\n' and sorted(os.listdir(tmp_path)) == ["report.md"]


def test_leftovers_of_dead_writers_are_removed_others_named(tmp_path, capsys):
  dst = tmp_path / "out"
  host = atomic._host()  # pylint: disable=protected-access
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  stale = tmp_path / f"out.tmp-{dead}-{host}-abc"
  live = tmp_path / f"out.tmp-{os.getpid()}-{host}-def"
  foreign = tmp_path / "out.tmp-q1w2e3"
  for d in (stale, live, foreign):
    d.mkdir()
  with atomic.atomic_directory(dst) as tmp:
    (tmp / "x").write_text("1")
  err = capsys.readouterr().err
  assert not stale.exists() and live.exists() and foreign.exists()
  assert str(stale) in err and str(live) in err and str(foreign) in err
  assert (dst / "x").read_text() == "1"


@pytest.mark.parametrize("dst,why", [("src", "is the same as"), ("src/sub", "is inside"),
                                     (".", "contains")])
def test_destination_overlapping_the_source_is_refused(tmp_path, dst, why):
  (tmp_path / "src").mkdir()
  with pytest.raises(atomic.DestinationError, match=why):
    atomic.check_disjoint(tmp_path / "src", tmp_path / dst)
  atomic.check_disjoint(tmp_path / "src", tmp_path / "elsewhere")


def test_free_space_message_gives_the_figures(tmp_path, monkeypatch):
  monkeypatch.setattr(atomic, "free_bytes", lambda p: 1_500_000)
  with pytest.raises(atomic.DestinationError,
                     match=r"needs about 3\.0 MB at --out .* which has 1\.5 MB free"):
    atomic.check_free_space(tmp_path / "a" / "b", 3_000_000, "the dataset", "--out")


def test_staging_allocates_its_blocks_so_a_full_disk_is_an_error_not_sigbus(small_disk):
  # A sparse staging file on a full disk dies with SIGBUS at the first memory-mapped write;
  # allocated up front, the full disk is an OSError (ENOSPC) before anything is written.
  with pytest.raises(OSError) as e:
    orbax_io.MemmapStaging(small_disk / "staging", {("w",): ((64, 1024), np.float32)})
  assert e.value.errno == errno.ENOSPC and "w.bin" in str(e.value.filename)


# ----------------------------------------------------------------------------------------------
# asd_jax.cli


def test_cli_error_lines_and_debug(monkeypatch, capsys):
  def failing(argv):
    del argv
    raise OSError(errno.ENOSPC, "No space left on device", "/x/y")
  assert cli.run(failing, []) == 1
  err = capsys.readouterr().err
  assert err == "error: no space left on device (/x/y): free some space or choose a writable " \
                "location.\n"
  with pytest.raises(OSError):
    cli.run(failing, ["--debug"])

  def diverged(argv):
    del argv
    from asd_jax.train.metrics import NonFiniteError
    raise NonFiniteError("3 consecutive steps had non-finite losses or gradients")
  assert cli.run(diverged, []) == 1
  assert capsys.readouterr().err == ("error: 3 consecutive steps had non-finite losses or "
                                     "gradients\n")
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(OSError):
    cli.run(failing, [])


# ----------------------------------------------------------------------------------------------
# convert


def _tiny_safetensors(path):
  import safetensors.numpy
  from asd_jax.convert import wan_keys
  from asd_jax.models import wan
  cfg = wan.WanConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=3, freq_dim=16, text_dim=12,
                      in_channels=4, out_channels=8)
  rng = np.random.default_rng(0)
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file({n: rng.standard_normal(s.torch_shape).astype(np.float32)
                               for n, s in wan_keys.expected_keys(cfg).items()}, path)
  return path


def _listing(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command", ["wan", "release"])
@pytest.mark.parametrize("dst", ["src", "src/inner", "."])
def test_convert_refuses_a_dst_overlapping_src(tmp_path, capsys, command, dst):
  from asd_jax.convert.__main__ import main
  src = tmp_path / "src"
  src.mkdir()
  (src / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
  (src / "Wan2.1_VAE.pth").write_bytes(b"x")
  (src / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"x")
  (src / "google" / "umt5-xxl").mkdir(parents=True)
  (src / "google" / "umt5-xxl" / "t.json").write_text("{}")
  before = _listing(tmp_path)
  assert main([command, f"--src={src}", f"--dst={tmp_path / dst}", "--overwrite"]) == 1
  err = capsys.readouterr().err
  assert re.search(r"^error: --dst .* (is the same as|is inside|contains) --src ", err), err
  assert _listing(tmp_path) == before


def test_convert_checks_free_space_first_and_noise_is_gone(tmp_path, capsys, monkeypatch):
  from asd_jax.convert.__main__ import main
  src = _tiny_safetensors(tmp_path / "m.safetensors")
  monkeypatch.setattr(atomic, "free_bytes", lambda p: 10_000)
  assert main(["wan", f"--src={src}", f"--dst={tmp_path / 'out'}", "--num_heads=2"]) == 1
  err = capsys.readouterr().err
  # 2 x the float32 params (staging + output): the figure is the converter's own count.
  assert re.search(r"error: not enough free disk for the wan conversion: it needs about "
                   r"\d+\.\d kB .* which has 10\.0 kB free", err), err
  assert _listing(tmp_path) == ["m.safetensors"]
  monkeypatch.undo()
  assert main(["wan", f"--src={src}", f"--dst={tmp_path / 'out'}", "--num_heads=2"]) == 0
  err = capsys.readouterr().err
  assert "OCDBT" not in err and "Skipping merge" not in err


def test_convert_onto_a_full_disk_fails_with_a_message(tmp_path, small_disk, capsys,
                                                        monkeypatch):
  # The free-space check is bypassed so that the write itself meets the full disk.
  from asd_jax.convert.__main__ import main
  src = _tiny_safetensors(tmp_path / "m.safetensors")
  monkeypatch.setattr(atomic, "free_bytes", lambda p: 1 << 40)
  assert main(["wan", f"--src={src}", f"--dst={small_disk / 'out'}", "--num_heads=2"]) == 1
  err = capsys.readouterr().err
  assert "error: no space left on device" in err
  assert os.listdir(small_disk) == []


def test_a_missing_diffusers_key_is_named_as_in_the_users_file(tmp_path):
  import safetensors.numpy
  from asd_jax.convert import wan as cw
  from asd_jax.convert import wan_keys
  from asd_jax.convert.common import ConversionError
  from asd_jax.models import wan
  cfg = wan.WanConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=3, freq_dim=16, text_dim=12,
                      in_channels=4, out_channels=8)
  state = {wan_keys.original_to_diffusers(n): np.zeros(spec.torch_shape, np.float32)
           for n, spec in wan_keys.expected_keys(cfg).items()}
  del state["blocks.1.attn2.to_k.weight"]
  safetensors.numpy.save_file(state, tmp_path / "d.safetensors")
  with pytest.raises(ConversionError, match=r"missing \(1\):\n    blocks\.1\.attn2\.to_k\.weight "
                     r"\(original name blocks\.1\.cross_attn\.k\.weight\) \[32, 32\]"):
    cw.convert(tmp_path / "d.safetensors", tmp_path / "out", num_heads=2, verbose=False)


def test_damaged_converted_directory_is_named_in_one_line(tmp_path):
  from asd_jax import pretrained
  from asd_jax.convert import wan as cw
  cw.convert(_tiny_safetensors(tmp_path / "m.safetensors"), tmp_path / "dit", num_heads=2,
             verbose=False)
  chunk = next((tmp_path / "dit" / "params" / "blocks.ffn.fc1.kernel").glob("0.*"))
  with open(chunk, "r+b") as f:
    f.truncate(100)
  with pytest.raises(orbax_io.DamagedCheckpointError) as e:
    pretrained.load(tmp_path / "dit")
  msg = str(e.value)
  assert "\n" not in msg and str(chunk) in msg and "Truncated" in msg, msg


# ----------------------------------------------------------------------------------------------
# sample


def _frames():
  rng = np.random.default_rng(0)
  return iter([rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8) for _ in range(2)])


def test_mp4_written_whole_or_not_at_all(tmp_path, monkeypatch):
  from asd_jax import sample
  out = tmp_path / "v.mp4"
  assert sample.write_mp4(out, _frames(), (32, 32)) == 10
  good = out.read_bytes()
  assert sample._has_moov(out)  # pylint: disable=protected-access

  def truncated(tmp, frames, size, fps):  # what ffmpeg leaves on a full disk
    del frames, size, fps
    tmp.write_bytes(good[:4096])
    return 10
  monkeypatch.setattr(sample, "_encode_mp4", truncated)
  with pytest.raises(sample.VideoWriteError, match="incomplete video"):
    sample.write_mp4(out, _frames(), (32, 32))
  assert out.read_bytes() == good and os.listdir(tmp_path) == ["v.mp4"]


def test_mp4_onto_a_full_disk(small_disk):
  from asd_jax import sample
  out = small_disk / "v.mp4"
  out.write_bytes(b"the old video")
  rng = np.random.default_rng(0)
  frames = iter([rng.integers(0, 255, (9, 64, 64, 3), dtype=np.uint8) for _ in range(3)])
  with pytest.raises(sample.VideoWriteError):
    sample.write_mp4(out, frames, (64, 64))
  assert out.read_bytes() == b"the old video" and os.listdir(small_disk) == ["v.mp4"]


@pytest.mark.parametrize("argv,msg", [
    (["--height=0"], r"--height must be a positive multiple of 16 pixels, got 0"),
    (["--width=-16"], r"--width must be a positive multiple of 16 pixels"),
    (["--num_frames=-3"], r"--num_frames must be a positive 4k \+ 1 count of video frames"),
    (["--steps=0"], r"--steps must be >= 1"),
    (["--sink_frames=-1"], r"--sink_frames must be >= 0"),
    (["--cache_frames=0"], r"--cache_frames must be >= 1"),
])
def test_sample_flags_refused_before_anything(tmp_path, capsys, argv, msg):
  from asd_jax import sample
  out = tmp_path / "new" / "v.mp4"
  assert sample.main(["--prompt=x", f"--model_dir={tmp_path}", f"--output={out}", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and re.search(msg, err) and err.count("\n") == 1, err
  assert "sink" not in err or "sink" in argv[0]
  assert os.listdir(tmp_path) == []


def test_sample_points_a_training_workdir_to_its_export(tmp_path, capsys):
  from asd_jax import sample
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  for part in ("vae", "umt5", "tokenizer"):
    (tmp_path / "m" / part).mkdir(parents=True)
  assert sample.main(["--prompt=x", f"--model_dir={tmp_path / 'm'}", f"--checkpoint={run}",
                      f"--output={tmp_path / 'v.mp4'}"]) == 2
  err = capsys.readouterr().err
  assert f"--checkpoint={run / 'export'}" in err and "training workdir" in err, err


# ----------------------------------------------------------------------------------------------
# data.build and data.ode_pairs


def test_build_refuses_flags_and_a_dataset_the_disk_cannot_hold(tmp_path, capsys, monkeypatch):
  from asd_jax.data import build
  prompts = tmp_path / "p.txt"
  prompts.write_text("a cat\n" * 1000)
  umt5 = tmp_path / "umt5"
  umt5.mkdir()
  (umt5 / "config.json").write_text('{"kind": "umt5", "config": {"d_model": 4096}}')
  (tmp_path / "tok").mkdir()
  base = [f"--prompts={prompts}", f"--umt5={umt5}", f"--tokenizer={tmp_path / 'tok'}"]
  before = _listing(tmp_path)
  assert build.main([*base, f"--out={tmp_path / 'ds'}", "--batch_size=0"]) == 2
  assert "--batch_size and --text_len must be >= 1, got 0" in capsys.readouterr().err
  monkeypatch.setattr(atomic, "free_bytes", lambda p: 1_000_000)
  assert build.main([*base, f"--out={tmp_path / 'ds'}"]) == 2
  err = capsys.readouterr().err
  # 1000 prompts of 5 bytes: 3 tokens each (5 // 3 + 2) + 512 for the negative prompt, x 4096 x 2.
  assert f"needs about {atomic.fmt_bytes((3000 + 512) * 4096 * 2)}" in err, err
  assert "which has 1.0 MB free" in err and err.startswith("error: ")
  assert _listing(tmp_path) == before


@pytest.mark.parametrize("flag,msg", [("--steps=0", "--steps must be >= 1"),
                                      ("--shift=-5", "--shift must be a finite number > 0"),
                                      ("--guidance=-3", "--guidance must be a finite number >= 0"),
                                      ("--training_timesteps=1000,x", "comma-separated numbers")])
def test_ode_pairs_flags_refused(tmp_path, capsys, flag, msg):
  from asd_jax.data import ode_pairs
  argv = [f"--prompts={tmp_path / 'p'}", f"--teacher={tmp_path / 't'}",
          f"--out={tmp_path / 'o'}", flag]
  assert ode_pairs.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and msg in err, err
  assert os.listdir(tmp_path) == []


def test_ode_pairs_out_inside_prompts_refused(tmp_path, capsys):
  from asd_jax.data import ode_pairs
  (tmp_path / "p").mkdir()
  assert ode_pairs.main([f"--prompts={tmp_path / 'p'}", f"--teacher={tmp_path / 't'}",
                         f"--out={tmp_path / 'p' / 'o'}"]) == 2
  assert "--out" in capsys.readouterr().err and os.listdir(tmp_path / "p") == []


# ----------------------------------------------------------------------------------------------
# Training checkpoints


def _saved_steps(directory, steps=(1, 2, 3)):
  from asd_jax.train.checkpoint import Checkpointer
  state = {"w": jnp.arange(1000.0), "b": jnp.ones((3, 4))}
  with Checkpointer(directory, save_interval_steps=1, async_save=False,
                    handle_sigterm=False) as ck:
    for step in steps:
      ck.save(step, jax.tree.map(lambda x, s=step: x + s, state))
  return state


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  from asd_jax.train.checkpoint import Checkpointer
  directory = tmp_path / "checkpoints"
  state = _saved_steps(directory)
  files = [f for f in glob.glob(f"{directory}/3/state/**", recursive=True)
           if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)
  with Checkpointer(directory, save_interval_steps=1, handle_sigterm=False) as ck:
    restored, _, step = ck.restore_latest(state)
    assert step == 2 and float(restored["w"][1]) == 3.0
    assert ck.all_steps() == [1, 2]  # the damaged one moved aside: step 3 can be saved again
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  damaged = [m for m in warnings if "is damaged" in m]
  assert len(damaged) == 1 and "\n" not in damaged[0], warnings
  assert "checkpoint 3" in damaged[0] and "falling back to checkpoint 2" in damaged[0]
  assert str(directory / "3" / "state") in damaged[0]
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints.damaged").iterdir()] == ["3"]


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_any_work(tmp_path, monkeypatch):
  # An asynchronous save onto a full disk fails in Orbax's writer threads with a traceback
  # each; the state's size is checked first (when the run starts, and before every save).
  from asd_jax.train.checkpoint import Checkpointer
  state = {"w": jnp.zeros((100_000,)), "key": jax.random.key(0)}
  monkeypatch.setattr(atomic, "free_bytes", lambda p: 300_000)
  with Checkpointer(tmp_path / "checkpoints", handle_sigterm=False) as ck:
    with pytest.raises(OSError) as e:
      ck.restore_latest(jax.eval_shape(lambda: state))
    assert e.value.errno == errno.ENOSPC
    assert cli.message(e.value) == (
        f"not enough free disk for a checkpoint: it needs about 400.0 kB at --workdir "
        f"{tmp_path / 'checkpoints'}, which has 300.0 kB free; free some space or choose "
        f"another --workdir.")
    with pytest.raises(OSError, match="checkpoint 1"):
      ck.save(1, state, force=True)
    assert ck.all_steps() == []


def test_keep_zero_and_every_zero_answer_in_config_names(tmp_path):
  from asd_jax.train.checkpoint import Checkpointer
  with pytest.raises(ValueError, match=r"checkpoint\.keep"):
    Checkpointer(tmp_path / "c", max_to_keep=0)
  with pytest.raises(ValueError, match=r"checkpoint\.every"):
    Checkpointer(tmp_path / "c", save_interval_steps=0)


def test_first_line_status_and_preemption_flag(tmp_path):
  from asd_jax.train import checkpoint
  directory = tmp_path / "checkpoints"
  assert checkpoint.start_status(directory, 5) == f"starting fresh in {tmp_path} (5 steps)"
  assert not directory.exists()
  _saved_steps(directory, steps=(2, 4))
  assert checkpoint.start_status(directory, 5).startswith(f"resuming {tmp_path} from step 4 of 5")
  assert checkpoint.start_status(directory, 4).startswith(
      f"nothing left to do in {tmp_path}: checkpoint 4 reached total_steps 4")
  assert not checkpoint.preempted()
  with checkpoint.Checkpointer(directory, save_interval_steps=100, handle_sigterm=False) as ck:
    ck.request_stop()
    ck.save(5, {"w": jnp.zeros(3)})
    assert ck.should_stop()
  assert checkpoint.preempted()
  checkpoint._PREEMPTED.clear()  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# The train and ablation entry points (subprocesses: their absl flags are process-global).


def _run(module, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop(cli.DEBUG_ENV, None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, env=env, timeout=300, check=False)


def test_train_bad_flags_are_one_line_and_exit_2(tmp_path):
  (tmp_path / "afile").write_text("")
  r = _run("asd_jax.train", "--config=configs/nope.py", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2 and r.stderr.startswith("error: --config=configs/nope.py: cannot "
                                                   "load it"), r.stderr
  _no_tracebacks(r.stderr)
  r = _run("asd_jax.train", "--config=configs/asd.py:tiny", f"--workdir={tmp_path / 'afile'}")
  assert r.returncode == 2 and r.stderr == (f"error: --workdir {tmp_path / 'afile'} is a file; "
                                            f"give a directory.\n"), r.stderr
  assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_ablation_bad_seeds_leave_nothing(tmp_path):
  r = _run("asd_jax.toy.ablation", f"--workdir={tmp_path / 'abl'}", "--seeds=a,b")
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1] == ("error: --alphas and --seeds take comma-separated "
                                               "numbers (invalid literal for int() with base 10: "
                                               "'a').")
  _no_tracebacks(r.stderr)
  assert os.listdir(tmp_path) == []
