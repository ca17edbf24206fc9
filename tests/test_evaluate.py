"""`python -m asd_jax.evaluate` on tiny random parts: VBench videos (names, seeds, resume, shards),
the VBench score weighting, 20-second-style videos with a rolling cache, step similarity, distances."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax import sample
from asd_jax.evaluate import __main__ as cli
from asd_jax.evaluate import steps
from asd_jax.evaluate import vbench_scores as vs
from asd_jax.evaluate import videos as vid
from asd_jax.sampling import generate

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat runs", "the blue sky", "a lazy dog"]
# A "long" video for the tiny cache: 33 frames = 9 latent frames = 3 chunks through a 6-frame
# cache that keeps 3 sink frames, so the window rolls (the 20-second path at toy size).
SIZE = ["--num_frames=33", "--height=16", "--width=16", "--dtype=float32", "--cache_frames=6",
        "--sink_frames=3", "--quiet"]


# ------------------------------------------------------------------ no model needed


def test_settings():
  got = vid.parse_settings("4, 2*,1*", 4)
  assert [(s.name, s.steps, s.ffe, s.folder) for s in got] == [
      ("4", 4, False, "4"), ("2*", 2, True, "2_ffe"), ("1*", 1, True, "1_ffe")]
  for bad in ("5", "0*", "x", "", "2,2"):
    with pytest.raises(ValueError):
      vid.parse_settings(bad, 4)


def test_names_are_vbench_names_and_shards_split_without_overlap(tmp_path):
  assert vid.video_name("a cat", 3) == "a cat-3.mp4"
  with pytest.raises(ValueError, match="'/'"):
    vid.video_name("AC/DC on stage", 0)
  with pytest.raises(ValueError, match="255 bytes"):
    vid.video_name("x" * 260, 0)
  prompts = [f"prompt {i}" for i in range(7)]
  shards = [vid.work_items(prompts, 5, tmp_path, k, 3) for k in range(3)]
  paths = [it.path for items in shards for it in items]
  assert len(paths) == len(set(paths)) == 35
  assert set(paths) == {it.path for it in vid.work_items(prompts, 5, tmp_path, 0, 1)}
  assert {it.prompt_index for it in shards[1]} == {1, 4}


def test_video_keys_are_a_function_of_seed_prompt_and_sample():
  k = lambda *a: np.asarray(jax.random.key_data(vid.video_key(*a)))
  np.testing.assert_array_equal(k(0, 3, 1), k(0, 3, 1))
  assert len({k(*a).tobytes() for a in [(0, 3, 1), (0, 1, 3), (1, 3, 1), (0, 3, 2)]}) == 4


def _fake_vbench(root, entries):
  pkg = root / "vbench"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("raise ImportError('vbench must not be imported for prompts')")
  (pkg / vid.VBENCH_INFO).write_text(json.dumps(entries))
  return root


def test_standard_prompt_suite_is_read_from_the_installed_package(tmp_path, monkeypatch):
  entries = [{"prompt_en": "a dog", "dimension": ["scene"]},
             {"prompt_en": "a cat", "dimension": ["color"]},
             {"prompt_en": "a dog", "dimension": ["object_class"]}]
  monkeypatch.syspath_prepend(str(_fake_vbench(tmp_path, entries)))
  monkeypatch.delitem(sys.modules, "vbench", raising=False)
  prompts, source = vid.load_prompts(None)
  assert prompts == ["a dog", "a cat"] and source == "vbench:VBench_full_info.json"


def test_without_vbench_or_prompts_the_error_says_what_to_do(monkeypatch, capsys):
  monkeypatch.setattr(vid.importlib.util, "find_spec", lambda name: None)
  assert cli.main(["vbench", "--model_dir=nowhere", "--out=nowhere"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "pip install vbench" in err and "--prompts" in err


@pytest.mark.parametrize("argv,msg", [
    (["--settings=5"], "not n or n\\* with n in \\[1, 4\\]"),
    (["--settings=2*", "--num_frames=30"], "4k \\+ 1"),
    (["--samples=0"], "--samples"),
    (["--num_shards=2", "--shard=2"], "--shard"),
    ([], "missing model parts"),
])
def test_impossible_arguments_fail_before_any_work(tmp_path, capsys, argv, msg):
  prompts = tmp_path / "p.txt"
  prompts.write_text("a cat\n")
  rc = cli.main(["vbench", f"--model_dir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}",
                 f"--prompts={prompts}", *argv])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: ") and __import__("re").search(msg, err), err
  assert not (tmp_path / "out").exists()


# VBench Leaderboard (huggingface.co/spaces/Vchitect/VBench_Leaderboard), row "LaVie": Total 77.08 %,
# Quality 78.78 %, Semantic 70.31 %; its 16 dimension scores (the same as the LaVie row of Table 1
# of the VBench paper, Huang et al., CVPR 2024), in VBench's order.
LAVIE = dict(zip(
    ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
     "dynamic_degree", "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects",
     "human_action", "color", "spatial_relationship", "scene", "appearance_style",
     "temporal_style", "overall_consistency"),
    (91.41, 97.47, 98.30, 96.38, 49.72, 54.94, 61.90, 91.82, 33.32, 96.80, 86.39, 34.09, 52.69,
     23.56, 25.93, 26.41)))


def test_weighting_reproduces_vbench_leaderboard_totals():
  got = vs.weighted_scores({d: v / 100 for d, v in LAVIE.items()})
  # The leaderboard rounds to 0.01 %: the weighting must land within that rounding.
  assert abs(100 * got["total"] - 77.08) <= 0.005
  assert abs(100 * got["quality"] - 78.78) <= 0.005
  assert abs(100 * got["semantic"] - 70.31) <= 0.005
  # Plain means of the raw scores (no normalisation, no weights) miss by far more than that.
  raw = np.array(list(LAVIE.values()))
  assert abs(raw.mean() - 77.08) > 1.0
  partial = vs.weighted_scores({d: v / 100 for d, v in LAVIE.items() if d != "scene"})
  assert partial["semantic"] is None and partial["total"] is None and partial["quality"]
  assert partial["missing"] == ["scene"]


def _fake_videos_dir(root, settings=("2*", "1*")):
  folders = {s: s.replace("*", "_ffe") for s in settings}
  manifest = {"run": {"settings": {s: {"folder": f} for s, f in folders.items()}, "samples": 1},
              "prompts": ["a cat"]}
  root.mkdir(parents=True)
  (root / vid.MANIFEST).write_text(json.dumps(manifest))
  for f in folders.values():
    (root / f).mkdir()
    (root / f / "a cat-0.mp4").write_bytes(b"")
  return root, folders


def test_score_tables_from_vbench_results(tmp_path, capsys):
  videos, folders = _fake_videos_dir(tmp_path / "videos")
  out = tmp_path / "scores"
  out.mkdir()
  for s, f in folders.items():  # VBench's own results file: {dim: [mean, [per video]]}
    shift = 0.0 if s == "2*" else -0.02
    results = {d: [v / 100 + shift, [{"video_path": "x", "video_results": 1.0}]]
               for d, v in LAVIE.items()}
    (out / f"{f}_eval_results.json").write_text(json.dumps(results))
  assert cli.main(["vbench-score", f"--videos={videos}", f"--out={out}"]) == 0
  tables = json.loads((out / "scores.json").read_text())
  assert [t["setting"] for t in tables] == ["2*", "1*"]
  assert abs(100 * tables[0]["total"] - 77.08) <= 0.005
  assert tables[1]["total"] < tables[0]["total"]
  assert tables[0]["paper"][0] == {"row": "ASD (ours), Table 1", "total": 0.8432,
                                   "quality": 0.8515, "semantic": 0.8102}
  md = (out / "scores.md").read_text()
  assert "| 2* | this model | 77.08 | 78.78 | 70.31 |" in md
  assert "| 1* | paper: ASD (ours), Table 1 | 83.89 | 84.55 | 81.24 |" in md
  assert "| dynamic_degree | 49.72 | 47.72 |" in md


def test_score_without_vbench_or_weights_says_what_is_missing(tmp_path, capsys, monkeypatch):
  videos, _ = _fake_videos_dir(tmp_path / "videos", ("4",))
  monkeypatch.setattr(vs, "check_vbench", lambda python: "ModuleNotFoundError: No module named 'x'")
  assert cli.main(["vbench-score", f"--videos={videos}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: VBench is not importable") and "--vbench_python" in err
  monkeypatch.setattr(vs, "check_vbench", lambda python: None)
  monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "cache"))
  assert cli.main(["vbench-score", f"--videos={videos}", "--dimensions=scene,color"]) == 2
  err = capsys.readouterr().err
  assert "tag2text_swin_14m.pth (scene;" in err and "grit_b_densecap_objectdet.pth (color;" in err
  assert "ViClip" not in err
  (videos / "4" / "a cat-0.mp4").unlink()
  assert cli.main(["vbench-score", f"--videos={videos}"]) == 2
  assert "lacks 1 videos" in capsys.readouterr().err


def test_frechet_distance_of_known_gaussians():
  # Rows with exactly known mean (0, 0) and covariance diag(2/3, 8/3); b = a * (2, 1/2) + (3, 1)
  # has mean (3, 1) and covariance diag(8/3, 2/3): d = 10 + 20/3 - 2 * (4/3 + 4/3) = 34/3.
  a = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
  b = a * np.array([2.0, 0.5]) + np.array([3.0, 1.0])
  assert steps.frechet_distance(a, b) == pytest.approx(34 / 3, rel=1e-9)
  assert steps.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------ tiny random parts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  pytest.importorskip("sentencepiece")
  import tiny_parts
  return tiny_parts.model_dir(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
  path.write_text("\n".join(PROMPTS) + "\n")
  return path


def _vbench_args(model_dir, prompts_file, out, *extra):
  return cli.parser().parse_args(
      ["vbench", f"--model_dir={model_dir}", f"--out={out}", f"--prompts={prompts_file}",
       "--samples=2", "--settings=1,1*", "--batch=4", "--save_latents", *SIZE, *extra])


@pytest.fixture(scope="module")
def run(model_dir, prompts_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("vbench")
  args = _vbench_args(model_dir, prompts_file, out)
  return args, vid.generate_videos(args), out


def _latents(out, folder, name):
  return np.load(out / vid.LATENTS_DIR / folder / (Path(name).stem + ".npy"))


def test_vbench_videos_names_counts_and_manifest(run):
  args, summary, out = run
  assert summary["written"] == 12 and summary["skipped"] == 0
  # 3 chunks, 2 batches of 4 (the second padded): one compile per setting.
  assert summary["compiles"] == {"1": 1, "1*": 1}
  expected = {f"{p}-{s}.mp4" for p in PROMPTS for s in range(2)}
  for folder in ("1", "1_ffe"):
    assert {p.name for p in (out / folder).iterdir()} == expected
  assert sorted(p.name for p in out.iterdir()) == ["1", "1_ffe", "latents", "manifest.json"]
  import imageio_ffmpeg
  reader = imageio_ffmpeg.read_frames(str(out / "1_ffe" / "the blue sky-1.mp4"))
  meta = next(reader)
  assert tuple(meta["size"]) == (16, 16) and sum(1 for _ in reader) == 33
  manifest = json.loads((out / "manifest.json").read_text())
  run_ = manifest["run"]
  assert run_["settings"]["1*"]["first_chunk_timesteps"] == [1000.0, 937.5, 833.3333333333334, 625.0]
  assert run_["settings"]["1*"]["later_chunk_timesteps"] == [1000.0]
  assert run_["settings"]["1"]["first_chunk_timesteps"] == [1000.0]
  assert (run_["cache_frames"], run_["sink_frames"], run_["seed"]) == (6, 3, 0)
  assert manifest["prompts"] == PROMPTS and "jax" in manifest["versions"]


def test_each_video_is_generate_on_its_own_key_through_the_rolling_cache(run, model_dir):
  """The long-video path (rolling cache with sinks) equals `generate` called directly."""
  args, _, out = run
  models = sample.load_models(sample.resolve_parts(args), args.dtype)
  setting = vid.Setting("1*", 1, True)
  req = vid.setting_request(args, setting)
  context, _ = models.encoder([PROMPTS[2]])
  shape = (1, 9, 2, 2, models.dit.config.in_channels)
  direct_fn = jax.jit(lambda prm, c, z, r: generate(
      models.dit, prm, c, z, first_chunk_timesteps=req.first, later_chunk_timesteps=req.later,
      rng=r, cache_frames=6, sink_frames=3))
  for p, s in ((2, 1), (2, 0)):
    noise, rk = sample.video_noise(vid.video_key(0, p, s), shape)
    direct = np.asarray(direct_fn(models.dit_params, jnp.asarray(context), noise, rk))[0]
    got = _latents(out, "1_ffe", f"{PROMPTS[p]}-{s}.mp4")
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-5)
  # The tolerance is far below what a different key changes.
  other = _latents(out, "1_ffe", f"{PROMPTS[1]}-1.mp4")
  assert np.abs(other - got).max() > 100 * 1e-5


def test_resume_after_a_kill_regenerates_exactly_the_missing_files(run, monkeypatch):
  args, _, out = run
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
  gone = [out / "1" / "a lazy dog-0.mp4", out / "1_ffe" / "a red cat runs-1.mp4"]
  old = {g: _latents(out, g.parent.name, g.name) for g in gone}
  for g in gone:
    g.unlink()
    (out / vid.LATENTS_DIR / g.parent.name / (g.stem + ".npy")).unlink()
  # A run killed while writing its second video: the first is complete, the second half written.
  real_write, calls = sample.write_mp4, []

  def killed(path, frames, size, fps=sample.FPS):
    calls.append(path)
    if len(calls) == 2:
      def some():
        yield next(iter(frames))
        raise KeyboardInterrupt
      return real_write(path, some(), size, fps)
    return real_write(path, frames, size, fps)

  monkeypatch.setattr(sample, "write_mp4", killed)
  with pytest.raises(KeyboardInterrupt):
    vid.generate_videos(args)
  assert gone[0].exists() and not gone[1].exists()
  monkeypatch.setattr(sample, "write_mp4", real_write)
  summary = vid.generate_videos(args)
  assert summary["written"] == 1 and summary["skipped"] == 11
  for g in gone:
    np.testing.assert_array_equal(_latents(out, g.parent.name, g.name), old[g])
  untouched = [p for p in before if p not in gone]
  assert all(p.stat().st_mtime_ns == before[p] for p in untouched)
  assert not [p for p in out.rglob("*") if "partial" in p.name]
  assert vid.generate_videos(args)["written"] == 0


def test_a_different_run_into_the_same_folder_is_refused(run, capsys):
  args, _, out = run
  argv = ["vbench", f"--model_dir={args.model_dir}", f"--out={out}", f"--prompts={args.prompts}",
          "--samples=2", "--settings=1,1*", *SIZE, "--seed=1"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "holds videos of another run (seed differ" in err


def test_two_shards_write_disjoint_halves_of_the_same_videos(run, model_dir, prompts_file,
                                                            tmp_path):
  _, _, ref = run
  out = tmp_path / "sharded"
  s0 = vid.generate_videos(_vbench_args(model_dir, prompts_file, out, "--num_shards=2",
                                        "--shard=0", "--settings=1"))
  assert {p.name for p in (out / "1").iterdir()} == {
      f"{p}-{s}.mp4" for p in (PROMPTS[0], PROMPTS[2]) for s in range(2)}
  s1 = vid.generate_videos(_vbench_args(model_dir, prompts_file, out, "--num_shards=2",
                                        "--shard=1", "--settings=1"))
  assert (s0["written"], s1["written"]) == (4, 2)
  assert len(list((out / "1").iterdir())) == 6
  for f in (out / "latents" / "1").iterdir():  # the same videos as one process, batch for batch
    np.testing.assert_array_equal(np.load(f), np.load(ref / "latents" / "1" / f.name))


@pytest.mark.slow  # about 35 s on two shared CPU cores (two compiles of the step-returning sampler)
def test_similarity_matrices_equal_a_direct_computation(model_dir, prompts_file, tmp_path):
  out = tmp_path / "sim"
  args = cli.parser().parse_args(
      ["similarity", f"--model_dir={model_dir}", f"--prompts={prompts_file}", "--samples=1",
       "--training_steps=2", "--setting=2", "--batch=2", "--num_frames=21", "--height=16", "--width=16",
       "--dtype=float32", f"--out={out}", "--quiet"])
  got = steps.step_similarity(args)
  assert json.loads((out / "similarity.json").read_text())["videos"] == 3
  assert (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"
  models = sample.load_models(sample.resolve_parts(args), "float32")
  req = vid.setting_request(args, vid.Setting("2", 2, False))
  direct_fn = jax.jit(lambda prm, c, z, r: generate(
      models.dit, prm, c, z, first_chunk_timesteps=req.first, later_chunk_timesteps=req.later,
      rng=r, return_steps=True))
  first_m, later_m = [], []
  for p, prompt in enumerate(PROMPTS):
    context, _ = models.encoder([prompt])
    noise, rk = sample.video_noise(vid.video_key(0, p, 0), (1, 6, 2, 2, 4))
    _, first, later = direct_fn(models.dit_params, jnp.asarray(context), noise, rk)
    f = np.asarray(first, np.float64).reshape(2, -1)
    l = np.asarray(later, np.float64).reshape(2, -1)
    cos = lambda x: (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    first_m.append(cos(f))
    later_m.append(cos(l))
  np.testing.assert_allclose(got["first_chunk"], np.mean(first_m, 0), atol=1e-6)
  np.testing.assert_allclose(got["later_chunks"], np.mean(later_m, 0), atol=1e-6)
  m = np.asarray(got["first_chunk"])
  np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
  # The steps are not all alike (the matrix has something to show at this tolerance).
  assert m.min() < 1 - 1e-3


@pytest.mark.slow
def test_distances_with_a_teacher_and_a_feature_seam(model_dir, prompts_file, tmp_path):
  out = tmp_path / "dist"
  base = ["distances", f"--model_dir={model_dir}", f"--prompts={prompts_file}", "--samples=2",
          "--training_steps=2", "--num_frames=9", "--height=16", "--width=16", "--dtype=float32",
          f"--teacher={model_dir / 'dit'}", "--teacher_steps=3", f"--out={out}", "--quiet"]
  assert cli.main(base) == 0
  got = json.loads((out / "distances.json").read_text())
  assert got["feature"] == steps.LATENT_FEATURE and got["videos"] == 6
  assert set(got["n_to_n_plus_1"]) == {"1"} and set(got["n_to_teacher"]) == {"1", "2"}
  assert all(np.isfinite(v) and v > 0 for v in got["n_to_teacher"].values())
  assert cli.main(base + ["--features=tests.test_evaluate:_mean_pixels"]) == 0
  got = json.loads((out / "distances.json").read_text())
  assert got["feature"].endswith("tests.test_evaluate:_mean_pixels features")


def _mean_pixels(videos):
  return videos.reshape(videos.shape[0], videos.shape[1], -1).mean(-1)


@pytest.mark.slow
def test_killed_process_resumes_and_two_processes_split_the_work(model_dir, prompts_file,
                                                                 tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "proc"
  argv = [sys.executable, "-m", "asd_jax.evaluate", "vbench", f"--model_dir={model_dir}",
          f"--out={out}", f"--prompts={prompts_file}", "--samples=2", "--settings=1",
          "--batch=1", *SIZE]
  proc = subprocess.Popen(argv, cwd=REPO, env=env)
  deadline = time.time() + 300
  while time.time() < deadline and not list((out / "1").glob("*.mp4")):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = {p.name for p in (out / "1").glob("[!.]*.mp4")}
  assert 0 < len(done) < 6
  procs = [subprocess.Popen(argv + ["--num_shards=2", f"--shard={k}"], cwd=REPO, env=env)
           for k in range(2)]
  assert [p.wait(timeout=600) for p in procs] == [0, 0]
  assert {p.name for p in (out / "1").iterdir()} == {
      f"{p}-{s}.mp4" for p in PROMPTS for s in range(2)}
