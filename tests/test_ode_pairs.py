"""ODE pairs: a tiny random teacher's trajectories stored exactly, reproducible noise, atomic and
resumable builds, the join with the prompt dataset, and clear refusals."""

import hashlib
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from asd_jax import pretrained
from asd_jax.data import build
from asd_jax.data import ode_pairs
from asd_jax.data.ode_pairs import OdePairDataset, OdePairError
from asd_jax.data.ode_pairs import trajectories
from asd_jax.data.prompts import DatasetError, PromptDataset
from asd_jax.diffusion.euler import euler_sample
from asd_jax.io import orbax_io
from asd_jax.models import wan

BF16 = np.dtype(ml_dtypes.bfloat16)
CFG = wan.WanConfig.preset("tiny")
TEXT_LEN = 16
F, H, W = 3, 4, 6
SHAPE = (F, H, W, CFG.in_channels)
PROMPTS = ["a cat surfing a wave", "a red fox in the snow", "一只熊猫在竹林里吃竹子"]
# 5 examples cycle through the 3 prompts; shards of 2 and batches of 2 pad the last batch.
KW = dict(num_examples=5, frames=F, height=H, width=W, batch_size=2, examples_per_shard=2,
          dtype="float32", progress=False)


class Encoder:
  """encode(prompts) -> (context f32 [N, TEXT_LEN, d] zero past each length, lengths [N])."""

  def __init__(self, d: int = CFG.text_dim):
    self.d = d

  def __call__(self, prompts):
    ctx = np.zeros((len(prompts), TEXT_LEN, self.d), np.float32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
      s = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
      lengths[i] = 1 + s % TEXT_LEN
      ctx[i, :lengths[i]] = np.random.default_rng(s).standard_normal((lengths[i], self.d))
    return ctx, lengths


def write_teacher(directory):
  """A random tiny Wan DiT in the converter's layout: config.json + params/ (Orbax)."""
  init = jax.jit(wan.init_params, static_argnums=0)  # compiled: much faster than op by op
  params = jax.tree.map(np.asarray, init(CFG, jax.random.key(0)))
  flat = orbax_io.flatten(params)
  orbax_io.save_tree(directory / pretrained.PARAMS_DIR, flat,
                     stacked=[p for p in flat if p[0] == "blocks"])
  (directory / pretrained.CONFIG_FILE).write_text(
      json.dumps({"kind": "wan", "config": CFG.to_dict()}))
  return directory


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ode")
  prompts = build.build_dataset(PROMPTS, root / "prompts", Encoder(), text_len=TEXT_LEN,
                                progress=False)
  teacher = write_teacher(root / "teacher")
  pairs = ode_pairs.build_ode_pairs(prompts, teacher, root / "pairs", **KW)
  return root, prompts, teacher, pairs


# The documented noise formula (compiled once: eager random ops compile op by op).
_normal = jax.jit(lambda seed, i: jax.random.normal(jax.random.fold_in(jax.random.key(seed), i),
                                                     SHAPE))
_euler = jax.jit(lambda p, noise, ctx, neg, grid: euler_sample(
    wan.WanModel(CFG), p, noise, ctx, neg, timesteps=grid, guidance_scale=6.0,
    return_trajectory=True), static_argnums=4)


def reference(prompts_dir, teacher_dir, batch, seed=0):
  """euler_sample's trajectory for one batch of example indices, with the build's inputs."""
  _, params = pretrained.load(teacher_dir)
  ds = PromptDataset(prompts_dir)
  ctx = ds.get_batch(np.asarray(batch) % len(ds))["context"]
  neg = np.broadcast_to(ds.negative_context, ctx.shape)
  noise = jnp.stack([_normal(seed, i) for i in batch])
  plan = ode_pairs.ode_timesteps()
  x, traj = _euler(params, noise, ctx, neg, plan.grid)
  return np.asarray(traj)[list(plan.indices)].swapaxes(0, 1), np.asarray(x), np.asarray(noise)


def _bits(x):
  return np.asarray(x).astype(BF16).view(np.uint16)


def _listing(directory):
  return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------------------------
# Timesteps and noise


def test_training_timesteps_on_the_grid():
  plan = ode_pairs.ode_timesteps()  # 48 steps, shift 5
  np.testing.assert_allclose(plan.timesteps, [1000, 937.5, 2500 / 3, 625], rtol=0, atol=1e-9)
  assert plan.indices == (0, 12, 24, 36) and len(plan.grid) == 49 and plan.grid[-1] == 0
  shift8 = ode_pairs.ode_timesteps(48, 8.0)  # Self Forcing's script: [1000, 960, 888.9, 727.3]
  np.testing.assert_allclose(shift8.timesteps, [1000, 960, 8000 / 9, 8000 / 11], atol=1e-9)
  assert ode_pairs.ode_timesteps(8, 5.0, [1000, 500]).indices == (0, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=50), r"not points of the 50-step grid.*Grid: \[1000.0, .*a multiple of 4 steps"),
    (dict(training_timesteps=[1000, 700]), r"\[1000.0, 700.0\].*multiple of 10 steps"),
    (dict(training_timesteps=[1000, 333.333]), "no step count up to 10000"),
    (dict(training_timesteps=[250, 500]), "strictly decreasing"),
    (dict(training_timesteps=[1000, 0]), r"outside \(0, 1000\]"),
    (dict(steps=0), "steps must be"),
    (dict(shift=-1.0), "shift must be")])
def test_off_grid_and_bad_timesteps(kwargs, match):
  with pytest.raises(OdePairError, match=match):
    ode_pairs.ode_timesteps(**kwargs)


def test_noise_depends_on_seed_and_index_only():
  both = ode_pairs.example_noise(3, [7, 2], SHAPE)
  assert both.shape == (2,) + SHAPE and both.dtype == jnp.float32
  np.testing.assert_array_equal(both[::-1], ode_pairs.example_noise(3, [2, 7], SHAPE))
  np.testing.assert_array_equal(both[0], _normal(3, 7))
  assert not np.array_equal(both[0], ode_pairs.example_noise(4, [7, 2], SHAPE)[0])
  assert abs(float(both.std()) - 1) < 0.2


# ----------------------------------------------------------------------------------------------
# The dataset


def test_pairs_are_the_teacher_trajectory(parts):
  _, prompts, teacher, out = parts
  ds = OdePairDataset(out)
  assert len(ds) == 5 and ds.latent_shape == SHAPE
  np.testing.assert_allclose(ds.timesteps, [1000, 937.5, 833.3333, 625], rtol=1e-6)
  assert ds.info["timestep_indices"] == [0, 12, 24, 36] and ds.info["guidance_scale"] == 6.0
  got = ds.get_batch(np.arange(5))
  assert got["noisy"].shape == (5, 4) + SHAPE and got["clean"].shape == (5,) + SHAPE
  assert got["noisy"].dtype == np.float32 and got["timesteps"].dtype == np.float32
  np.testing.assert_array_equal(got["index"], np.arange(5))
  np.testing.assert_array_equal(got["prompt_index"], [0, 1, 2, 0, 1])
  assert list(got["prompt"]) == [PROMPTS[i] for i in [0, 1, 2, 0, 1]]
  # The build's batches: [0, 1], [2, 3] (one per shard), then [4] padded to [4, 4].
  for batch, rows in (([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4, 4], [4])):
    noisy, clean, noise = reference(prompts, teacher, batch)
    n = len(rows)
    assert np.array_equal(_bits(got["noisy"][rows]), _bits(noisy[:n]))  # bf16 of the trajectory
    assert np.array_equal(_bits(got["clean"][rows]), _bits(clean[:n]))
    assert np.array_equal(_bits(got["noisy"][rows, 0]), _bits(noise[:n]))  # x at t = 1000
  assert np.abs(got["clean"] - got["noisy"][:, -1]).max() > 0.1  # x at 625 is not x0
  raw = OdePairDataset(out, dtype="bfloat16")[3]
  assert raw["noisy"].dtype == BF16 and raw["index"] == 3 and raw["prompt_index"] == 0
  assert np.array_equal(raw["clean"].view(np.uint16), _bits(got["clean"][3]))


def test_float32_storage_is_exact(parts, tmp_path):
  _, prompts, teacher, _ = parts
  out = ode_pairs.build_ode_pairs(prompts, teacher, tmp_path / "f32", store_dtype="float32",
                                  seed=11, **{**KW, "num_examples": 2})
  got = OdePairDataset(out).get_batch([0, 1])
  noisy, clean, _ = reference(prompts, teacher, [0, 1], seed=11)
  np.testing.assert_array_equal(got["noisy"], noisy)
  np.testing.assert_array_equal(got["clean"], clean)


def test_tfds_layout_without_tensorflow(parts):
  import tensorflow_datasets as tfds

  out = parts[3]
  builder = tfds.builder_from_directory(os.fspath(out))
  assert builder.info.file_format.value == "array_record"
  assert builder.info.splits["train"].shard_lengths == [2, 2, 1]
  assert builder.info.features["noisy"].np_dtype == BF16
  assert "937.5" in builder.info.description
  assert _listing(out) == sorted(["dataset_info.json", "features.json", ode_pairs.MARKER] + [
      f"ode_pairs-train.array_record-0000{i}-of-00003" for i in range(3)])
  assert "tensorflow" not in sys.modules


def test_with_context(parts, tmp_path):
  _, prompts, _, out = parts
  joined = OdePairDataset(out).with_context(prompts)
  batch = joined.get_batch([4, 2])
  want = PromptDataset(prompts).get_batch([1, 2])
  np.testing.assert_array_equal(batch["context"], want["context"])
  np.testing.assert_array_equal(batch["length"], want["length"])
  assert batch["noisy"].shape == (2, 4) + SHAPE and joined[0]["prompt"] == PROMPTS[0]
  # Another prompt dataset: refused at the join (other size) or at the first batch (other text).
  other = build.build_dataset(PROMPTS[:2], tmp_path / "two", Encoder(), text_len=TEXT_LEN,
                              progress=False)
  with pytest.raises(DatasetError, match="3 prompts"):
    OdePairDataset(out).with_context(other)
  shuffled = build.build_dataset(PROMPTS[::-1], tmp_path / "rev", Encoder(), text_len=TEXT_LEN,
                                 progress=False)
  with pytest.raises(DatasetError, match="other prompts"):
    OdePairDataset(out).with_context(shuffled).get_batch([0])


# ----------------------------------------------------------------------------------------------
# Interruptions


class Crash(Exception):
  pass


def _crash_on_call(monkeypatch, k):
  """Makes the k-th (1-based) teacher batch raise; returns the list of calls made."""
  calls, real = [], ode_pairs.generate_pairs

  def wrapped(*args, **kwargs):
    calls.append(np.asarray(args[2]).tolist())
    if len(calls) == k:
      raise Crash("teacher died")
    return real(*args, **kwargs)
  monkeypatch.setattr(trajectories, "generate_pairs", wrapped)  # where the shards call it
  return calls


def test_interrupted_build_leaves_nothing_that_opens_and_resumes(parts, tmp_path, monkeypatch):
  _, prompts, teacher, full = parts
  out = tmp_path / "pairs"
  calls = _crash_on_call(monkeypatch, 3)
  with pytest.raises(Crash):
    ode_pairs.build_ode_pairs(prompts, teacher, out, **KW)
  assert not out.exists()
  with pytest.raises(FileNotFoundError):
    OdePairDataset(out)
  partial = ode_pairs.partial_dir(out)
  assert _listing(tmp_path) == [partial.name]
  with pytest.raises(DatasetError, match="no ode_pairs.json"):
    OdePairDataset(partial)
  assert len([p for p in partial.iterdir() if ".array_record-" in p.name]) == 2
  # Not continued by accident, nor with other settings.
  with pytest.raises(OdePairError, match="--resume"):
    ode_pairs.build_ode_pairs(prompts, teacher, out, **KW)
  with pytest.raises(OdePairError, match="seed: 0 then, 1 now"):
    ode_pairs.build_ode_pairs(prompts, teacher, out, resume=True, **{**KW, "seed": 1})
  other = build.build_dataset(PROMPTS[::-1], tmp_path / "other", Encoder(), text_len=TEXT_LEN,
                              progress=False)
  with pytest.raises(OdePairError, match="prompt_dataset: not the one used before"):
    ode_pairs.build_ode_pairs(other, teacher, out, resume=True, **KW)
  shutil.rmtree(other)
  # A killed process leaves the shard it was writing: resuming discards it, generates the last
  # shard only, and equals the uninterrupted build bit for bit.
  (partial / "ode_pairs-train.array_record-00002-of-00003.tmp").write_bytes(b"half a shard")
  calls.clear()
  ode_pairs.build_ode_pairs(prompts, teacher, out, resume=True, **KW)
  assert calls == [[4, 4]]
  assert _listing(tmp_path) == ["pairs"]
  a, b = OdePairDataset(out).get_batch(range(5)), OdePairDataset(full).get_batch(range(5))
  for key in ("noisy", "clean", "prompt_index"):
    np.testing.assert_array_equal(a[key], b[key])


def test_failure_before_any_shard_removes_everything(parts, tmp_path, monkeypatch):
  _, prompts, teacher, _ = parts
  _crash_on_call(monkeypatch, 1)
  with pytest.raises(Crash):
    ode_pairs.build_ode_pairs(prompts, teacher, tmp_path / "pairs", **KW)
  assert _listing(tmp_path) == []


def test_resume_without_partial_builds_afresh(parts, tmp_path):
  _, prompts, teacher, _ = parts
  out = ode_pairs.build_ode_pairs(prompts, teacher, tmp_path / "p", resume=True,
                                  **{**KW, "num_examples": 1})
  assert len(OdePairDataset(out)) == 1 and _listing(tmp_path) == ["p"]


# ----------------------------------------------------------------------------------------------
# Refusals and the command line


def test_bad_inputs(parts, tmp_path):
  root, prompts, teacher, out = parts
  build_ = lambda **kw: ode_pairs.build_ode_pairs(**{"prompts": prompts, "teacher": teacher,
                                                     "out": tmp_path / "x", **KW, **kw})
  with pytest.raises(FileNotFoundError, match="prompt dataset"):
    build_(prompts=tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="--teacher"):
    build_(teacher=tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    build_(teacher=root)  # a directory, but not a converted one
  with pytest.raises(build.BuildError, match="not empty"):
    build_(out=out)
  with pytest.raises(OdePairError, match="not points of the 42-step grid"):
    build_(steps=42)
  with pytest.raises(OdePairError, match="multiples of the patch size"):
    build_(height=5)
  with pytest.raises(OdePairError, match="seed"):
    build_(seed=2**31)
  with pytest.raises(OdePairError, match="store_dtype"):
    build_(store_dtype="float16")
  narrow = build.build_dataset(PROMPTS, tmp_path / "narrow", Encoder(8), text_len=TEXT_LEN,
                               progress=False)
  with pytest.raises(OdePairError, match="width 32 .* width 8"):
    build_(prompts=narrow)
  assert _listing(tmp_path) == ["narrow"]
  with pytest.raises(DatasetError, match="complete ODE-pair dataset"):
    OdePairDataset(prompts)
  with pytest.raises(IndexError):
    OdePairDataset(out).get_batch([5])


def test_command_line(parts, tmp_path, capsys):
  _, prompts, teacher, _ = parts
  common = [f"--prompts={prompts}", f"--teacher={teacher}", f"--frames={F}", f"--height={H}",
            f"--width={W}", "--batch_size=2", "--dtype=float32", "--quiet"]
  assert ode_pairs.main([*common, f"--out={tmp_path / 'cli'}", "--num_examples=2",
                         "--store_dtype=float32"]) == 0
  ds = OdePairDataset(tmp_path / "cli")
  assert len(ds) == 2 and ds.info["store_dtype"] == "float32" and ds.info["seed"] == 0
  assert ode_pairs.main([*common, f"--out={tmp_path / 'bad'}", "--steps=50"]) == 2
  err = capsys.readouterr().err
  assert "not points of the 50-step grid" in err and "Grid: [1000.0" in err
  assert ode_pairs.main([*common, f"--out={tmp_path / 'bad'}",
                         "--training_timesteps=1000,x"]) == 2
  assert not (tmp_path / "bad").exists()
