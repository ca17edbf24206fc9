"""Prompt datasets: build (fake encoder), read back bit for bit, stateless batches, failures."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from asd_jax.data import build
from asd_jax.data import prompts as prompts_lib
from asd_jax.data.prompts import DatasetError, PromptDataset, batch_indices, epoch_permutation

REPO = Path(__file__).resolve().parents[1]
TEXT_LEN, D = 16, 8
BF16 = np.dtype(ml_dtypes.bfloat16)


def _seed(prompt: str) -> int:
  return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")


def fake_context(prompt: str) -> np.ndarray:
  """The fake encoder's trimmed context of one prompt: float32 [length, D], length in [1, 16]."""
  s = _seed(prompt)
  return np.random.default_rng(s).standard_normal((1 + s % TEXT_LEN, D)).astype(np.float32)


class FakeEncoder:
  """encode(prompts) -> (context f32 [N, TEXT_LEN, D] zero past each length, lengths i32 [N]).

  Values are arbitrary float32 (not bfloat16-representable), so storing rounds them. With
  `fail_on_call=k` the k-th call (0-based) raises, as an encoder crashing mid-build would.
  """

  def __init__(self, fail_on_call: int | None = None):
    self.calls = 0
    self.fail_on_call = fail_on_call

  def __call__(self, prompts):
    if self.calls == self.fail_on_call:
      raise RuntimeError("encoder died")
    self.calls += 1
    ctx = np.zeros((len(prompts), TEXT_LEN, D), np.float32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
      c = fake_context(p)
      ctx[i, :len(c)] = c
      lengths[i] = len(c)
    return ctx, lengths


PROMPTS_TEXT = ("a cat surfing a wave\n"
                "\n"
                "  a red fox in the snow  \r\n"
                "一只熊猫在竹林里吃竹子\n"
                "   \n"
                "a cat surfing a wave\n"
                "a &amp; b, \"quoted\", tabs\tinside\n"
                "a long prompt " + "word " * 40 + "\n")
PROMPTS = ["a cat surfing a wave", "a red fox in the snow", "一只熊猫在竹林里吃竹子",
           "a cat surfing a wave", "a &amp; b, \"quoted\", tabs\tinside",
           ("a long prompt " + "word " * 40).strip()]
PROMPTS += [f"prompt number {i}" for i in range(13)]


@pytest.fixture
def prompts_file(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text(PROMPTS_TEXT + "".join(f"prompt number {i}\n" for i in range(13)),
                  encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A dataset of PROMPTS built in batches of 4 with shards of a few examples each."""
  out = tmp_path_factory.mktemp("built") / "ds"
  build.build_dataset(PROMPTS, out, FakeEncoder(), text_len=TEXT_LEN, batch_size=4,
                      shard_bytes=600, progress=False)
  return out


# ----------------------------------------------------------------------------------------------
# Prompts file


def test_read_prompts(prompts_file):
  src = build.read_prompts(prompts_file)
  assert src.prompts == PROMPTS
  assert src.num_blank == 2 and src.num_duplicates == 1 and src.num_lines == len(PROMPTS) + 2
  assert "19 prompts" in src.summary() and "2 blank" in src.summary()


def test_read_prompts_bom_and_no_final_newline(tmp_path):
  path = tmp_path / "p.txt"
  path.write_bytes("\ufeffone\r\ntwo\u2028still two\rthree".encode("utf-8"))
  assert build.read_prompts(path).prompts == ["one", "two\u2028still two", "three"]


@pytest.mark.parametrize("content, match", [(None, "does not exist"), ("", "no prompt"),
                                            ("\n  \n\t\n", "no prompt"),
                                            (b"ok\n\xff\xfe bad\n", "not UTF-8")])
def test_read_prompts_bad(tmp_path, content, match):
  path = tmp_path / "p.txt"
  if isinstance(content, bytes):
    path.write_bytes(content)
  elif content is not None:
    path.write_text(content)
  with pytest.raises((FileNotFoundError, build.BuildError), match=match):
    build.read_prompts(path)


# ----------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_bit_exact(built):
  ds = PromptDataset(built)
  assert len(ds) == len(PROMPTS) and (ds.text_len, ds.d_model) == (TEXT_LEN, D)
  batch = ds.get_batch(np.arange(len(PROMPTS)))
  assert batch["index"].dtype == np.int64 and np.array_equal(batch["index"], np.arange(len(ds)))
  assert list(batch["prompt"]) == PROMPTS
  assert batch["context"].shape == (len(PROMPTS), TEXT_LEN, D)
  assert batch["context"].dtype == np.float32 and batch["length"].dtype == np.int32
  for i, p in enumerate(PROMPTS):
    want = fake_context(p).astype(BF16)  # what storing in bfloat16 must give, bit for bit
    n = batch["length"][i]
    assert n == len(want)
    got = batch["context"][i, :n].astype(BF16)  # float32 -> bfloat16 is exact here
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert not batch["context"][i, n:].any()  # padding rows exactly zero
  # Single examples and a repeated, unordered batch agree with the full read.
  ex = ds[5]
  assert ex["index"] == 5 and ex["prompt"] == PROMPTS[5] and ex["length"] == batch["length"][5]
  assert np.array_equal(ex["context"], batch["context"][5])
  b2 = ds.get_batch([7, 0, 7])
  assert np.array_equal(b2["context"], batch["context"][[7, 0, 7]])
  # The stored dtype can be read as is.
  raw = PromptDataset(built, dtype="bfloat16").get_batch([3])["context"]
  assert raw.dtype == BF16 and np.array_equal(raw.view(np.uint16),
                                              batch["context"][[3]].astype(BF16).view(np.uint16))


def test_negative_prompt_stored(built):
  ds = PromptDataset(built)
  assert ds.negative_prompt == prompts_lib.WAN_NEGATIVE_PROMPT  # the default
  want = fake_context(prompts_lib.WAN_NEGATIVE_PROMPT).astype(BF16)
  assert ds.negative_length == len(want)
  assert ds.negative_context.shape == (TEXT_LEN, D)
  assert np.array_equal(ds.negative_context[:len(want)].astype(BF16).view(np.uint16),
                        want.view(np.uint16))
  assert not ds.negative_context[len(want):].any()
  info = json.loads((built / prompts_lib.MARKER).read_text(encoding="utf-8"))
  assert info["negative_prompt"] == prompts_lib.WAN_NEGATIVE_PROMPT
  assert info["num_examples"] == len(PROMPTS) and info["store_dtype"] == "bfloat16"


def test_wan_negative_prompt_text():
  """Wan 2.1's sample_neg_prompt (wan/configs/shared_config.py), character for character."""
  assert prompts_lib.WAN_NEGATIVE_PROMPT == (
      "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
      "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的"
      "肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def test_tfds_layout(built):
  """Plain TFDS (no TensorFlow) opens it: ArrayRecord shards, a bfloat16 Tensor feature."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(os.fspath(built))
  assert builder.info.file_format.value == "array_record"
  assert builder.info.splits["train"].num_shards > 1  # shard boundaries are exercised
  assert builder.info.features["embedding"].np_dtype == BF16
  src = builder.as_data_source()
  ex = src["train"][4]
  assert ex["embedding"].dtype == BF16 and ex["embedding"].shape == fake_context(PROMPTS[4]).shape
  assert len(src[prompts_lib.NEGATIVE_SPLIT]) == 1
  assert "tensorflow" not in sys.modules


def test_custom_negative_and_float32(tmp_path):
  out = build.build_dataset(["x", "y"], tmp_path / "ds", FakeEncoder(), negative_prompt="",
                            text_len=TEXT_LEN, store_dtype="float32", name="tiny_f32",
                            progress=False)
  ds = PromptDataset(out)
  assert ds.negative_prompt == "" and ds.info["name"] == "tiny_f32"
  assert np.array_equal(ds[1]["context"][:ds[1]["length"]], fake_context("y"))  # exact float32


def test_index_errors(built):
  ds = PromptDataset(built)
  with pytest.raises(IndexError):
    ds.get_batch([len(ds)])
  with pytest.raises(IndexError):
    ds.get_batch([-1])
  with pytest.raises(ValueError):
    ds.get_batch(np.zeros((2, 2), np.int64))
  with pytest.raises(TypeError):
    ds[1.0]  # pylint: disable=pointless-statement
  assert ds.get_batch([])["context"].shape == (0, TEXT_LEN, D)


# ----------------------------------------------------------------------------------------------
# Stateless sampler


def _stream(n, *, seed, steps, count, b):
  """Indices in stream order: step by step, process by process."""
  return np.concatenate([batch_indices(n, seed=seed, step=s, process_index=p, process_count=count,
                                       per_process_batch=b)
                         for s in range(steps) for p in range(count)])


@pytest.mark.parametrize("n, count, b", [(12, 2, 3), (10, 2, 3), (7, 3, 1), (5, 2, 4), (1, 1, 2)])
def test_batch_indices_cover_each_epoch_once(n, count, b):
  g = count * b
  steps = 3 * n // g + 2
  stream = _stream(n, seed=3, steps=steps, count=count, b=b)
  assert stream.dtype == np.int64 and len(stream) == steps * g
  for e in range(len(stream) // n):  # every complete epoch is a permutation
    assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert np.array_equal(stream[e * n:(e + 1) * n], epoch_permutation(n, seed=3, epoch=e))
  if n % g == 0:  # then each run of n / g steps is one epoch, split over the processes
    per_epoch = n // g
    for e in range(steps // per_epoch):
      idx = [batch_indices(n, seed=3, step=s, process_index=p, process_count=count,
                           per_process_batch=b)
             for s in range(e * per_epoch, (e + 1) * per_epoch) for p in range(count)]
      assert sorted(np.concatenate(idx).tolist()) == list(range(n))


def test_batch_indices_pure_and_varied():
  kw = dict(seed=1, process_count=4, per_process_batch=8)
  a = batch_indices(1000, step=17, process_index=2, **kw)
  prompts_lib._cached_permutation.cache_clear()  # a fresh process (e.g. a resumed run)
  assert np.array_equal(a, batch_indices(1000, step=17, process_index=2, **kw))
  assert not np.array_equal(a, batch_indices(1000, step=18, process_index=2, **kw))
  assert not np.array_equal(a, batch_indices(1000, step=17, process_index=3, **kw))
  assert not np.array_equal(a, batch_indices(1000, step=17, process_index=2, seed=2,
                                             process_count=4, per_process_batch=8))
  assert len(set(a.tolist())) == 8
  # Epochs are shuffled differently, and the same on any machine (pinned values).
  assert not np.array_equal(epoch_permutation(1000, seed=1, epoch=0),
                            epoch_permutation(1000, seed=1, epoch=1))
  assert epoch_permutation(10, seed=0, epoch=0).tolist() == _PINNED_PERMUTATION


_PINNED_PERMUTATION = [7, 2, 8, 0, 5, 6, 3, 9, 1, 4]


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_examples=0), ValueError), (dict(step=-1), ValueError),
    (dict(process_index=2), ValueError), (dict(per_process_batch=0), ValueError),
    (dict(step=1.0), TypeError), (dict(seed=None), TypeError)])
def test_batch_indices_bad(kwargs, error):
  args = dict(num_examples=10, seed=0, step=0, process_index=0, process_count=2,
              per_process_batch=2)
  args.update(kwargs)
  with pytest.raises(error):
    batch_indices(args.pop("num_examples"), **args)


# ----------------------------------------------------------------------------------------------
# Interrupted builds, bad inputs


def _partials(out: Path):
  return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


def test_interrupted_build_leaves_nothing_then_rerun(tmp_path):
  out = tmp_path / "ds"
  with pytest.raises(RuntimeError, match="encoder died"):
    build.build_dataset(PROMPTS, out, FakeEncoder(fail_on_call=3), text_len=TEXT_LEN,
                        batch_size=4, progress=False)
  assert not out.exists() and not _partials(out)
  with pytest.raises(FileNotFoundError):
    PromptDataset(out)
  build.build_dataset(PROMPTS, out, FakeEncoder(), text_len=TEXT_LEN, batch_size=4,
                      progress=False)
  assert list(PromptDataset(out).get_batch(np.arange(len(PROMPTS)))["prompt"]) == PROMPTS
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # made like any directory, not 0700


def test_killed_build_leftovers(tmp_path, built, capsys):
  """A killed build leaves a hidden partial directory: it never opens as a dataset."""
  out = tmp_path / "ds"
  partial = tmp_path / ".ds.partial-abc123"
  partial.mkdir()
  for f in built.iterdir():  # even with every data file present but the completeness mark
    if f.name != prompts_lib.MARKER:
      (partial / f.name).write_bytes(f.read_bytes())
  with pytest.raises(DatasetError, match="not a complete prompt dataset"):
    PromptDataset(partial)
  build.build_dataset(["a", "b"], out, FakeEncoder(), text_len=TEXT_LEN, progress=False)
  assert "leftovers of interrupted builds" in capsys.readouterr().err
  assert len(PromptDataset(out)) == 2


def test_existing_out(tmp_path, built):
  out = tmp_path / "ds"
  out.mkdir()
  build.build_dataset(["a"], out, FakeEncoder(), text_len=TEXT_LEN, progress=False)  # empty: ok
  with pytest.raises(build.BuildError, match="not empty"):
    build.build_dataset(["b"], out, FakeEncoder(), text_len=TEXT_LEN, progress=False)
  assert PromptDataset(out)[0]["prompt"] == "a"  # untouched
  # A failed overwrite keeps the old dataset; a complete one replaces it.
  with pytest.raises(RuntimeError):
    build.build_dataset(["b"], out, FakeEncoder(fail_on_call=1), text_len=TEXT_LEN,
                        overwrite=True, progress=False)
  assert PromptDataset(out)[0]["prompt"] == "a"
  build.build_dataset(["b", "c"], out, FakeEncoder(), text_len=TEXT_LEN, overwrite=True,
                      progress=False)
  assert list(PromptDataset(out).get_batch([0, 1])["prompt"]) == ["b", "c"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(build.BuildError, match="not a directory"):
    build.build_dataset(["a"], tmp_path / "file", FakeEncoder(), progress=False)


@pytest.mark.parametrize("bad, match", [
    (lambda c, n: (c[:, :-1], n), "shape"),
    (lambda c, n: (c + 1.0, n), "not zero past its length"),
    (lambda c, n: (np.where(c != 0, np.nan, c), n), "non-finite"),
    (lambda c, n: (c, n + TEXT_LEN), "lengths"),
    (lambda c, n: c, "context, lengths")])
def test_encoder_contract_checked(tmp_path, bad, match):
  enc = FakeEncoder()
  with pytest.raises(build.BuildError, match=match):
    build.build_dataset(["a"], tmp_path / "ds", lambda p: bad(*enc(p)), text_len=TEXT_LEN,
                        progress=False)
  assert not (tmp_path / "ds").exists()


def test_open_bad_directories(tmp_path):
  with pytest.raises(FileNotFoundError):
    PromptDataset(tmp_path / "nope")
  with pytest.raises(DatasetError, match="no prompt_dataset.json"):
    PromptDataset(tmp_path)


def _cli(args, capsys):
  rc = build.main(args)
  return rc, capsys.readouterr().err


def test_cli_bad_inputs(tmp_path, prompts_file, capsys):
  models = tmp_path / "models"
  models.mkdir()
  common = [f"--umt5={models}", f"--tokenizer={models}"]
  rc, err = _cli([f"--prompts={tmp_path / 'missing.txt'}", f"--out={tmp_path / 'o'}"] + common,
                 capsys)
  assert rc == 2 and "missing.txt does not exist" in err
  (tmp_path / "empty.txt").write_text("\n\n")
  rc, err = _cli([f"--prompts={tmp_path / 'empty.txt'}", f"--out={tmp_path / 'o'}"] + common,
                 capsys)
  assert rc == 2 and "holds no prompt" in err
  full = tmp_path / "full"
  full.mkdir()
  (full / "x").write_text("x")
  rc, err = _cli([f"--prompts={prompts_file}", f"--out={full}"] + common, capsys)
  assert rc == 2 and "exists and is not empty" in err and "--overwrite" in err
  rc, err = _cli([f"--prompts={prompts_file}", f"--out={tmp_path / 'o'}",
                  f"--umt5={tmp_path / 'none'}", f"--tokenizer={models}"], capsys)
  assert rc == 2 and "--umt5" in err
  rc, err = _cli([f"--prompts={prompts_file}", f"--out={tmp_path / 'o'}", "--name=Bad-Name"]
                 + common, capsys)
  assert rc == 2 and "--name" in err
  assert not (tmp_path / "o").exists()


def test_cli_with_fake_encoder(tmp_path, prompts_file, capsys, monkeypatch):
  monkeypatch.setattr(build, "load_encoder", lambda *a, **k: FakeEncoder())
  out = tmp_path / "ds"
  rc, err = _cli([f"--prompts={prompts_file}", f"--out={out}", f"--umt5={tmp_path}",
                  f"--tokenizer={tmp_path}", f"--text_len={TEXT_LEN}", "--negative_prompt=ugly",
                  "--batch_size=5", "--quiet"], capsys)
  assert rc == 0, err
  assert "19 prompts" in err and "1 duplicates kept" in err
  ds = PromptDataset(out)
  assert list(ds.get_batch(np.arange(len(ds)))["prompt"]) == PROMPTS
  assert ds.negative_prompt == "ugly" and ds.info["num_blank_lines"] == 2


def test_module_entry_point():
  r = subprocess.run([sys.executable, "-m", "asd_jax.data.build", "--help"], cwd=REPO,
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0 and "--negative_prompt" in r.stdout, r.stderr


# ----------------------------------------------------------------------------------------------
# End to end: the command line with a tiny real umT5 and tokenizer (as in test_umt5.py).


@pytest.fixture(scope="module")
def tiny_umt5(tmp_path_factory):
  """(converted umT5 folder, tokenizer folder): a random UMT5EncoderModel (vocab 256, d_model 32)
  converted by `asd_jax.convert umt5`, and a SentencePiece model trained here (vocab 200)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  pytest.importorskip("sentencepiece")
  import tiny_parts

  root = tmp_path_factory.mktemp("tiny_umt5")
  return tiny_parts.umt5(root), tiny_parts.train_tokenizer(root)


def test_cli_end_to_end_with_umt5(tmp_path, tiny_umt5):
  from asd_jax.text import TextEncoder

  umt5_dir, tokenizer_dir = tiny_umt5
  lines = ["a red cat", "", "the lazy fox runs over the dog", "a red cat", "blue sky " * 30]
  (tmp_path / "p.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  out = tmp_path / "ds"
  r = subprocess.run(
      [sys.executable, "-m", "asd_jax.data.build", f"--prompts={tmp_path / 'p.txt'}",
       f"--out={out}", f"--umt5={umt5_dir}", f"--tokenizer={tokenizer_dir}", "--batch_size=2",
       "--text_len=32", "--dtype=float32", "--negative_prompt=dog sky"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr
  assert "4 prompts from 5 lines (1 blank lines skipped, 1 duplicates kept)" in r.stderr

  ds = PromptDataset(out)
  prompts = [p for p in lines if p]
  batch = ds.get_batch(np.arange(len(ds)))
  assert list(batch["prompt"]) == [p.strip() for p in prompts]
  encoder = TextEncoder.load(umt5_dir, tokenizer_dir, dtype="float32", text_len=32, batch_size=2)
  context, lengths = encoder([p.strip() for p in prompts] + ["dog sky"])
  np.testing.assert_array_equal(batch["length"], lengths[:-1])
  assert lengths[-2] == 32  # the long prompt fills text_len
  # Stored in bfloat16: equal to the encoder's output within bfloat16 rounding; padding exact 0.
  np.testing.assert_allclose(batch["context"], context[:-1], rtol=2**-8, atol=1e-6)
  assert all(not batch["context"][i, n:].any() for i, n in enumerate(lengths[:-1]))
  assert ds.negative_prompt == "dog sky" and ds.negative_length == lengths[-1]
  np.testing.assert_allclose(ds.negative_context, context[-1], rtol=2**-8, atol=1e-6)
  assert ds.info["umt5"] == str(umt5_dir) and ds.info["encoder_dtype"] == "float32"
