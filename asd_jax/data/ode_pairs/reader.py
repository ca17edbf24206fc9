"""Reads ODE-pair datasets: random access by example, and the join with the prompt dataset.

    pairs = OdePairDataset(DIR).with_context(PromptDataset(PROMPTS))
    batch = pairs.get_batch([0, 1])  # noisy, clean, timesteps, context, length, ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from asd_jax.data import prompts as prompts_lib
from asd_jax.data.ode_pairs.layout import FORMAT_VERSION
from asd_jax.data.ode_pairs.layout import MARKER
from asd_jax.data.ode_pairs.layout import SPLIT


def _indices(indices: Any, size: int) -> np.ndarray:
  idx = np.asarray(indices)
  if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
    raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}.")
  idx = idx.astype(np.int64)
  if idx.size and (idx.min() < 0 or idx.max() >= size):
    raise IndexError(f"indices must lie in [0, {size}); got [{idx.min()}, {idx.max()}].")
  return idx


def _single(get_batch, index: Any) -> dict[str, Any]:
  if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
    raise TypeError(f"index must be an int, got {type(index).__name__} (use get_batch for "
                    f"several).")
  b = get_batch([int(index)])
  out = {k: v if k == "timesteps" else v[0] for k, v in b.items()}
  return {k: v.item() if isinstance(v, np.generic) else v for k, v in out.items()}


class OdePairDataset:
  """Random access to an ODE-pair dataset (the layout: `asd_jax.data.ode_pairs.layout`).

  Attributes:
    directory: the dataset directory.
    info: the build facts of `ode_pairs.json` (settings, teacher, prompt dataset, ...).
    timesteps: [K] float32, the training timesteps of `noisy` (e.g. [1000, 937.5, 833.3, 625]).
    latent_shape: (F, H, W, C).
    dtype: dtype of returned latents (float32 by default, or the stored bfloat16).
  """

  def __init__(self, directory: str | os.PathLike, *, dtype: Any = np.float32):
    """Opens DIR written by `python -m asd_jax.data.ode_pairs`.

    Raises:
      FileNotFoundError: no such directory.
      prompts.DatasetError: not a complete ODE-pair dataset (e.g. an interrupted build).
    """
    path = Path(directory).expanduser()
    if not path.is_dir():
      raise FileNotFoundError(f"ODE-pair dataset {path} does not exist (build one with "
                              f"`python -m asd_jax.data.ode_pairs --out={path} ...`).")
    marker = path / MARKER
    if not marker.is_file():
      raise prompts_lib.DatasetError(
          f"{path} is not a complete ODE-pair dataset: it has no {MARKER}, which the builder "
          f"writes last (an interrupted build leaves none; continue it with --resume).")
    info = json.loads(marker.read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
      raise prompts_lib.DatasetError(f"{marker} has format_version {info.get('format_version')!r}"
                                     f"; this code reads version {FORMAT_VERSION}.")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
      raise ValueError(f"dtype must be float32 or bfloat16, got {dt}.")
    self.directory, self.info, self.dtype = path, info, dt
    self.timesteps = np.asarray(info["timesteps"], np.float32)
    self.latent_shape = tuple(info["latent_shape"])
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      self._source = tfds.builder_from_directory(os.fspath(path)).as_data_source()[SPLIT]
    except Exception as e:  # TFDS raises assorted types for broken metadata
      raise prompts_lib.DatasetError(f"cannot open {path} as a TFDS ArrayRecord dataset: "
                                     f"{e}") from e
    if len(self._source) != info["num_examples"]:
      raise prompts_lib.DatasetError(f"{path} holds {len(self._source)} examples but {MARKER} "
                                     f"says {info['num_examples']}; rebuild it.")

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return (f"OdePairDataset({str(self.directory)!r}, {len(self)} pairs, timesteps "
            f"{self.timesteps.tolist()}, latents {list(self.latent_shape)})")

  def __getitem__(self, index: int) -> dict[str, Any]:
    """One example: get_batch's entries without the batch axis (ints and str for scalars)."""
    return _single(self.get_batch, index)

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Reads and stacks examples.

    Args:
      indices: [B] example indices in [0, len(self)).
    Returns:
      {'index': int64 [B], 'prompt_index': int64 [B] (rows of the prompt dataset), 'prompt':
      object [B] (str), 'noisy': [B, K, F, H, W, C] (x at 'timesteps'), 'clean': [B, F, H, W, C]
      (x0), 'timesteps': float32 [K]}, latents in `dtype`.
    """
    idx = _indices(indices, len(self))
    getitems = getattr(self._source, "__getitems__", None)  # one batched ArrayRecord read
    records = (getitems(idx.tolist()) if getitems else [self._source[int(i)] for i in idx]
               ) if idx.size else []
    stored = np.array([int(r["index"]) for r in records], np.int64)
    if not np.array_equal(stored, idx):
      raise prompts_lib.DatasetError(f"{self.directory}: records at {idx.tolist()} carry indices "
                                     f"{stored.tolist()}; the dataset is damaged.")
    k = len(self.timesteps)
    prompts = np.empty((len(records),), object)
    text = prompts_lib._text  # pylint: disable=protected-access
    prompts[:] = [text(r["prompt"]) for r in records]
    stack = lambda key, shape: (np.stack([r[key] for r in records]).astype(self.dtype) if records
                                else np.zeros((0,) + shape, self.dtype))
    return {"index": idx,
            "prompt_index": np.array([int(r["prompt_index"]) for r in records], np.int64),
            "prompt": prompts, "noisy": stack("noisy", (k,) + self.latent_shape),
            "clean": stack("clean", self.latent_shape), "timesteps": self.timesteps.copy()}

  def with_context(self, prompt_dataset: prompts_lib.PromptDataset | str | os.PathLike
                   ) -> "OdePairsWithContext":
    """This dataset joined with its prompt dataset: batches gain 'context' and 'length'."""
    return OdePairsWithContext(self, prompt_dataset)


class OdePairsWithContext:
  """ODE pairs with the prompts' contexts; every batch checks that the prompt texts agree.

  Attributes:
    pairs, prompts: the joined OdePairDataset and PromptDataset.
  """

  def __init__(self, pairs: OdePairDataset,
               prompt_dataset: prompts_lib.PromptDataset | str | os.PathLike):
    if not isinstance(prompt_dataset, prompts_lib.PromptDataset):
      prompt_dataset = prompts_lib.PromptDataset(prompt_dataset)
    if len(prompt_dataset) != pairs.info["num_prompts"]:
      raise prompts_lib.DatasetError(
          f"{pairs.directory} was made from a prompt dataset of {pairs.info['num_prompts']} "
          f"prompts ({pairs.info['prompts_dir']}); {prompt_dataset.directory} holds "
          f"{len(prompt_dataset)}.")
    self.pairs, self.prompts = pairs, prompt_dataset

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _single(self.get_batch, index)

  def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """`OdePairDataset.get_batch` plus 'context' [B, text_len, d_model] (zero from row 'length'
    on, the prompt dataset's dtype) and 'length' int32 [B]."""
    batch = self.pairs.get_batch(indices)
    ctx = self.prompts.get_batch(batch["prompt_index"])
    bad = batch["prompt"] != ctx["prompt"]
    if bad.any():
      raise prompts_lib.DatasetError(
          f"examples {batch['index'][bad].tolist()} of {self.pairs.directory} were made from other "
          f"prompts than rows {batch['prompt_index'][bad].tolist()} of {self.prompts.directory}: "
          f"join the prompt dataset they were made from ({self.pairs.info['prompts_dir']}).")
    return {**batch, "context": ctx["context"], "length": ctx["length"]}
