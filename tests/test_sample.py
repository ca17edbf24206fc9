"""`python -m asd_jax.sample` end to end on tiny random parts, and its argument checks."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asd_jax import sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  pytest.importorskip("sentencepiece")
  import tiny_parts
  return tiny_parts.model_dir(tmp_path_factory.mktemp("parts"))


def _read_mp4(path):
  import imageio_ffmpeg
  reader = imageio_ffmpeg.read_frames(str(path))
  meta = next(reader)
  frames = [np.frombuffer(f, np.uint8) for f in reader]
  return meta, frames


def test_cli_writes_an_mp4(model_dir, tmp_path):
  out = tmp_path / "video.mp4"
  r = subprocess.run(
      [sys.executable, "-m", "asd_jax.sample", f"--model_dir={model_dir}",
       "--prompt=a red cat runs over the lazy fox", "--steps=1", "--num_frames=33",
       "--height=32", "--width=48", "--dtype=float32", f"--output={out}", "--save_latents"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr
  assert "first chunk [1000.0, 937.5, 833.3333333333334, 625.0], later chunks [1000.0]" in r.stderr
  meta, frames = _read_mp4(out)
  assert tuple(meta["size"]) == (48, 32) and meta["fps"] == 16
  assert len(frames) == 33
  latents = np.load(out.with_suffix(".latents.npy"))
  assert latents.shape == (9, 4, 6, 4) and np.isfinite(latents).all()


@pytest.mark.slow  # suite budget (two runs of two prompts)
def test_offload_dit_changes_no_sample(model_dir, tmp_path):
  """--offload_dit moves the DiT's params to the host for each decode and back for the next
  prompt: the latents of both prompts are the ones without it, bit for bit."""
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red cat\nthe blue sky\n")
  runs = {}
  for flag in ([], ["--offload_dit"]):
    out = tmp_path / ("off" if flag else "on") / "v.mp4"
    args = sample.parser().parse_args([
        f"--model_dir={model_dir}", f"--prompts_file={prompts}", "--num_frames=9",
        "--height=16", "--width=16", "--steps=2", "--first_chunk_steps=2", "--dtype=float32",
        f"--output={out}", "--save_latents", "--quiet", *flag])
    runs[bool(flag)] = [np.load(p.with_suffix(".latents.npy")) for p in sample.run(args)]
  assert len(runs[True]) == 2
  for a, b in zip(runs[False], runs[True]):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(runs[True][0], runs[True][1])  # two prompts, two videos


def test_prompts_file_and_part_overrides(model_dir, tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red cat\n\nthe blue sky\n")
  args = sample.parser().parse_args([
      f"--checkpoint={model_dir / 'dit'}", f"--vae={model_dir / 'vae'}",
      f"--text_encoder={model_dir / 'umt5'}", f"--tokenizer={model_dir / 'tokenizer'}",
      f"--prompts_file={prompts}", "--num_frames=9", "--height=16", "--width=16",
      "--steps=2", "--first_chunk_steps=2", "--dtype=float32", f"--output={tmp_path / 'v.mp4'}",
      "--quiet"])
  written = sample.run(args)
  assert [p.name for p in written] == ["v_000.mp4", "v_001.mp4"]
  for path in written:
    meta, frames = _read_mp4(path)
    assert tuple(meta["size"]) == (16, 16) and len(frames) == 9


@pytest.mark.parametrize("argv,msg", [
    (["--num_frames=80"], "4k \\+ 1"),
    (["--num_frames=25"], "whole number of 3-frame chunks"),
    (["--height=100"], "multiples of 16"),
    (["--steps=5"], "later_steps"),
    (["--later_chunk_timesteps=1000,1000"], "strictly decreasing"),
    (["--first_chunk_timesteps=1200"], r"\(0, 1000\]"),
    (["--output=video.avi"], "must end in .mp4"),
    ([], "missing model parts"),
])
def test_impossible_arguments_fail_clearly(tmp_path, capsys, argv, msg):
  base = ["--prompt=x", f"--model_dir={tmp_path / 'nothing'}"]
  assert sample.main(base + argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and re.search(msg, err), err


def test_no_prompt(capsys):
  assert sample.main(["--model_dir=x"]) == 2
  assert "--prompt" in capsys.readouterr().err


def test_release_converts_into_the_model_dir_layout(model_dir):
  from asd_jax import pretrained
  from asd_jax.models import umt5, vae, wan
  assert sorted(p.name for p in model_dir.iterdir()) == ["dit", "tokenizer", "umt5", "vae"]
  for name, cls in (("dit", wan.WanModel), ("vae", vae.WanVAE), ("umt5", umt5.UMT5Encoder)):
    module, _ = pretrained.load(model_dir / name)
    assert isinstance(module, cls)
  assert module.config.dtype == "float32"
  assert (model_dir / "tokenizer" / "tokenizer_config.json").is_file()


def test_incomplete_release_is_refused_and_nothing_written(tmp_path, capsys):
  from asd_jax.convert.__main__ import main
  src = tmp_path / "release"
  src.mkdir()
  (src / "Wan2.1_VAE.pth").write_bytes(b"")
  assert main(["release", f"--src={src}", f"--dst={tmp_path / 'out'}"]) == 1
  err = capsys.readouterr().err
  for part in ("dit:", "umt5:", "tokenizer:"):
    assert part in err
  assert "vae:" not in err
  assert not (tmp_path / "out").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_param_dtype_stores_the_dit_and_vae_params_in_bfloat16(model_dir):
  """--param_dtype=bfloat16 halves the DiT's and the VAE's memory (the planner's
  --sample_param_dtype); the default keeps the converted float32."""
  import jax
  import jax.numpy as jnp
  args = sample.parser().parse_args([f"--model_dir={model_dir}", "--prompt=x",
                                     "--param_dtype=bfloat16"])
  parts = sample.resolve_parts(args)
  stored = sample.load_models(parts, "float32")
  half = sample.load_models(parts, "float32", args.param_dtype)
  for a, b in ((stored.dit_params, half.dit_params), (stored.vae_params, half.vae_params)):
    dtypes = {x.dtype for x in jax.tree.leaves(b)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes
    assert {x.dtype for x in jax.tree.leaves(a)} == {jnp.dtype(jnp.float32)}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x.astype(jnp.bfloat16), y), a, b)
