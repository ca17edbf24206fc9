"""Prompt datasets written by `python -m asd_jax.data.build`: random access and a stateless sampler.

    ds = PromptDataset("data/prompts")             # a directory written by the builder
    len(ds)                                        # number of prompts
    ex = ds[3]          # {'index': 3, 'prompt': str, 'context': f32 [512, 4096], 'length': int}
    idx = batch_indices(len(ds), seed=0, step=step, process_index=jax.process_index(),
                        process_count=jax.process_count(), per_process_batch=8)
    batch = ds.get_batch(idx)   # 'context' f32 [8, 512, 4096], zero past 'length' [8]; 'prompt'
    ds.negative_context, ds.negative_length          # the CFG negative prompt, [512, 4096] and int

A dataset directory is a TFDS dataset in the ArrayRecord format, read without TensorFlow through
`tfds.builder_from_directory(DIR).as_data_source()`:

    DIR/dataset_info.json, features.json            TFDS metadata
    DIR/{name}-train.array_record-0000i-of-0000n    one example per prompt, in file order
    DIR/{name}-negative_prompt.array_record-...     one example: the negative prompt
    DIR/prompt_dataset.json                         build facts, written last (completeness mark)

Each example holds `index` (int64, its position in the split), `prompt` (text) and `embedding`
([length, d_model], the umT5 context trimmed to the prompt's true length, stored as raw bfloat16
bytes so it reads back bit for bit). The reader pads it back with zeros to [text_len, d_model].
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes
import numpy as np

# Wan 2.1's default negative prompt (`sample_neg_prompt` of wan/configs/shared_config.py), the
# unconditional branch of classifier-free guidance; Self Forcing's DMD teacher uses the same text.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

MARKER = "prompt_dataset.json"  # written last by the builder; its absence means "incomplete"
FORMAT_VERSION = 1
TRAIN_SPLIT = "train"
NEGATIVE_SPLIT = "negative_prompt"
STORE_DTYPES = ("bfloat16", "float32")

_MASK64 = (1 << 64) - 1


class DatasetError(ValueError):
  """A directory that is not a complete, readable prompt dataset."""


# ----------------------------------------------------------------------------------------------
# Reading


def _float_dtype(dtype: Any) -> np.dtype:
  dt = np.dtype(dtype)
  if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dt}.")
  return dt


class PromptDataset:
  """Random access to a prompt dataset directory (see the module docstring for the layout).

  Attributes:
    directory: the dataset directory.
    info: the build facts of `prompt_dataset.json` (counts, text_len, d_model, sources, ...).
    text_len: padded context length (512 for Wan).
    d_model: context width (4096 for umT5-XXL).
    dtype: dtype of the returned contexts (float32 by default, or the stored bfloat16).
    negative_prompt: the negative prompt text.
    negative_context: [text_len, d_model] `dtype`, zero from row `negative_length` on.
    negative_length: number of tokens of the negative prompt (incl. EOS).
  """

  def __init__(self, directory: str | os.PathLike, *, dtype: Any = np.float32):
    """Opens DIR written by `python -m asd_jax.data.build`.

    Args:
      directory: the dataset directory.
      dtype: dtype of returned contexts: float32 (exact widening of the stored bfloat16) or
        bfloat16 (half the host memory).
    Raises:
      FileNotFoundError: no such directory.
      DatasetError: the directory is not a complete prompt dataset (e.g. an interrupted build).
    """
    path = Path(directory).expanduser()
    if not path.is_dir():
      raise FileNotFoundError(f"prompt dataset {path} does not exist (build one with "
                              f"`python -m asd_jax.data.build --prompts=FILE --out={path} ...`).")
    marker = path / MARKER
    if not marker.is_file():
      raise DatasetError(
          f"{path} is not a complete prompt dataset: it has no {MARKER}, which the builder writes "
          f"last (an interrupted build leaves none). Build it again with "
          f"`python -m asd_jax.data.build`.")
    try:
      info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise DatasetError(f"cannot read {marker}: {e}") from e
    if info.get("format_version") != FORMAT_VERSION:
      raise DatasetError(f"{marker} has format_version {info.get('format_version')!r}; this code "
                         f"reads version {FORMAT_VERSION}. Rebuild the dataset.")
    self.directory = path
    self.info = info
    self.text_len = int(info["text_len"])
    self.d_model = int(info["d_model"])
    self.dtype = _float_dtype(dtype)

    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      sources = tfds.builder_from_directory(os.fspath(path)).as_data_source()
    except Exception as e:  # TFDS raises assorted types for broken metadata
      raise DatasetError(f"cannot open {path} as a TFDS ArrayRecord dataset: {e}") from e
    for split in (TRAIN_SPLIT, NEGATIVE_SPLIT):
      if split not in sources:
        raise DatasetError(f"{path} has no '{split}' split (splits: {sorted(sources)}).")
    self._source = sources[TRAIN_SPLIT]
    if len(self._source) != info["num_examples"]:
      raise DatasetError(f"{path} holds {len(self._source)} examples but {MARKER} says "
                         f"{info['num_examples']}: the dataset is damaged; rebuild it.")
    if len(sources[NEGATIVE_SPLIT]) != 1:
      raise DatasetError(f"{path}: the '{NEGATIVE_SPLIT}' split must hold one example, it holds "
                         f"{len(sources[NEGATIVE_SPLIT])}.")
    neg = sources[NEGATIVE_SPLIT][0]
    self.negative_prompt = _text(neg["prompt"])
    self.negative_length = int(neg["embedding"].shape[0])
    self.negative_context = self._pad(neg["embedding"][None])[0]
    self.negative_context.flags.writeable = False

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return (f"PromptDataset({str(self.directory)!r}, {len(self)} prompts, "
            f"context [{self.text_len}, {self.d_model}] {self.dtype})")

  def _pad(self, embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Trimmed [length_i, d_model] arrays -> [B, text_len, d_model] `dtype`, zero-padded."""
    out = np.zeros((len(embeddings), self.text_len, self.d_model), self.dtype)
    for i, e in enumerate(embeddings):
      if e.ndim != 2 or e.shape[0] > self.text_len or e.shape[1] != self.d_model:
        raise DatasetError(f"{self.directory}: a stored embedding has shape {e.shape}; expected "
                           f"[<= {self.text_len}, {self.d_model}].")
      out[i, :e.shape[0]] = e
    return out

  def _check_indices(self, indices: Any) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
      raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}.")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise IndexError(f"indices must lie in [0, {len(self)}); got [{idx.min()}, {idx.max()}].")
    return idx

  def __getitem__(self, index: int) -> dict[str, Any]:
    """One example: {'index': int, 'prompt': str, 'context': [text_len, d_model], 'length': int}."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
      raise TypeError(f"index must be an int, got {type(index).__name__} (use get_batch for "
                      f"several).")
    b = self.get_batch([int(index)])
    return {"index": int(b["index"][0]), "prompt": b["prompt"][0], "context": b["context"][0],
            "length": int(b["length"][0])}

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Reads and stacks examples.

    Args:
      indices: [B] example indices in [0, len(self)) (e.g. from `batch_indices`).
    Returns:
      {'index': int64 [B], 'prompt': object [B] (str), 'context': `dtype` [B, text_len, d_model]
      (zero from row length[i] on), 'length': int32 [B] (tokens incl. EOS)}.
    """
    idx = self._check_indices(indices)
    getitems = getattr(self._source, "__getitems__", None)  # one batched ArrayRecord read
    if getitems is not None:
      records = getitems(idx.tolist()) if idx.size else []
    else:
      records = [self._source[int(i)] for i in idx]
    stored = np.array([int(r["index"]) for r in records], np.int64)
    if not np.array_equal(stored, idx):
      raise DatasetError(f"{self.directory}: records at positions {idx.tolist()} carry indices "
                         f"{stored.tolist()}; the dataset is damaged; rebuild it.")
    embeddings = [r["embedding"] for r in records]
    prompts = np.empty((len(records),), object)
    prompts[:] = [_text(r["prompt"]) for r in records]
    return {"index": idx, "prompt": prompts, "context": self._pad(embeddings),
            "length": np.array([e.shape[0] for e in embeddings], np.int32)}


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_dataset(directory: str | os.PathLike, *, dtype: Any = np.float32) -> PromptDataset:
  """Same as `PromptDataset(directory, dtype=dtype)`."""
  return PromptDataset(directory, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Stateless sampling


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser on uint64 arrays: a bijection of [0, 2^64) that scrambles all bits."""
  with np.errstate(over="ignore"):
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
  return x


def _mix_int(x: int) -> int:
  return int(_mix64(np.array([x & _MASK64], np.uint64))[0])


@functools.lru_cache(maxsize=8)
def _cached_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  k1 = _mix_int(seed + 0x9E3779B97F4A7C15)
  k2 = _mix_int(k1 ^ (epoch * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019))
  # i -> mix(mix(i ^ k1) ^ k2) is a bijection of uint64, so the keys are distinct and the sort
  # order (hence the permutation) is exact integer arithmetic: the same on every machine and
  # numpy version, unlike numpy's or jax's random streams.
  keys = _mix64(_mix64(np.arange(num_examples, dtype=np.uint64) ^ np.uint64(k1)) ^ np.uint64(k2))
  perm = np.argsort(keys, kind="stable").astype(np.int64)
  perm.flags.writeable = False
  return perm


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples: int64 [num_examples], a permutation.

  A pure function of (num_examples, seed, epoch) built from integer hashing (no RNG state), so
  it is identical across processes, machines and library versions. Any int seed (taken modulo
  2^64). The result is read-only (it is cached).
  """
  n = _check_int("num_examples", num_examples, 1)
  e = _check_int("epoch", epoch, 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
  return _cached_permutation(n, int(seed) & _MASK64, e)


def batch_indices(num_examples: int, *, seed: int, step: int, process_index: int,
                  process_count: int, per_process_batch: int) -> np.ndarray:
  """This process's example indices for training step `step`: int64 [per_process_batch].

  A pure function of its arguments, so a resumed run draws exactly the batches it would have
  drawn without stopping, and no sampler state needs checkpointing.

  The examples form an endless stream: epoch 0's permutation (`epoch_permutation(seed, 0)`),
  then epoch 1's, and so on. Step s consumes the global batch at stream positions
  [s * G, (s + 1) * G), G = per_process_batch * process_count, of which process p takes the
  contiguous slice starting at s * G + p * per_process_batch. Hence every example is drawn
  exactly once per epoch across all processes, an epoch lasting num_examples / G steps. When G
  does not divide num_examples, the batch at an epoch boundary takes the end of one epoch and the
  start of the next (it may then hold an example twice, as it does when G > num_examples).

  Args:
    num_examples: dataset size (>= 1).
    seed: the run's data seed (any int).
    step: training step (>= 0).
    process_index, process_count: this process and the number of processes (jax.process_index(),
      jax.process_count()).
    per_process_batch: examples per process per step (>= 1).
  """
  n = _check_int("num_examples", num_examples, 1)
  s = _check_int("step", step, 0)
  count = _check_int("process_count", process_count, 1)
  p = _check_int("process_index", process_index, 0)
  if p >= count:
    raise ValueError(f"process_index must be < process_count = {count}, got {p}.")
  b = _check_int("per_process_batch", per_process_batch, 1)
  positions = s * b * count + p * b + np.arange(b, dtype=np.int64)
  epochs, offsets = positions // n, positions % n
  out = np.empty((b,), np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(n, seed=seed, epoch=int(e))[offsets[sel]]
  return out
