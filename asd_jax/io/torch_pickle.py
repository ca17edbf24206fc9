"""Reads torch pickles (.pt/.pth/.bin/.ckpt) as a flat, lazily converted table of tensors.

`torch.load(..., mmap=True, weights_only=True)` maps the file instead of reading it, so tensors are
views of page cache until converted one by one. Nested dicts (training checkpoints with `generator`,
`critic`, ...) are flattened to dotted names; entries that are not tensors (step counters, configs)
are dropped. torch is imported only here, and only when a pickle is actually read.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # legacy (pre-1.6) torch files start with a pickled magic number


class NotTorchFileError(ValueError):
  """The file is neither a zip-format nor a legacy torch pickle."""


def looks_like_torch_file(path: str | os.PathLike) -> bool:
  with open(path, "rb") as f:
    head = f.read(4)
  return head.startswith(_ZIP_MAGIC) or (len(head) > 0 and head[0] == _PICKLE_PROTO)


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading .pt/.pth checkpoints needs torch (pip install 'asd_jax[convert]'); "
                      "safetensors files do not.") from e
  return torch


def _numpy_dtype(torch_dtype) -> np.dtype:
  torch = _torch()
  table = {
      torch.float64: np.dtype("f8"), torch.float32: np.dtype("f4"), torch.float16: np.dtype("f2"),
      torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.int64: np.dtype("i8"),
      torch.int32: np.dtype("i4"), torch.int16: np.dtype("i2"), torch.int8: np.dtype("i1"),
      torch.uint8: np.dtype("u1"), torch.bool: np.dtype("?"),
      torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn),
      torch.float8_e5m2: np.dtype(ml_dtypes.float8_e5m2),
  }
  if torch_dtype not in table:
    raise ValueError(f"torch dtype {torch_dtype} has no numpy equivalent here.")
  return table[torch_dtype]


def tensor_to_numpy(t) -> np.ndarray:
  """A torch CPU tensor -> numpy array sharing its memory where possible (bf16/fp8 via bit views)."""
  torch = _torch()
  t = t.detach()
  if t.device.type != "cpu":
    t = t.cpu()
  dtype = _numpy_dtype(t.dtype)
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(dtype)
  if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    return t.view(torch.uint8).numpy().view(dtype)
  return t.numpy()


def flatten_tensors(obj: Any, prefix: str = "", out: dict | None = None) -> dict[str, Any]:
  """Nested mappings -> {dotted name: tensor}; non-tensor leaves are dropped."""
  torch = _torch()
  out = {} if out is None else out
  if isinstance(obj, torch.Tensor):
    out[prefix] = obj
  elif isinstance(obj, Mapping):
    for k, v in obj.items():
      flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)
  elif isinstance(obj, torch.nn.Module):
    flatten_tensors(obj.state_dict(), prefix, out)
  return out


class TorchCheckpoint:
  """Tensors of a torch pickle, flattened to dotted names; `read` converts one at a time."""

  def __init__(self, path: str | os.PathLike, log: Callable[[str], None] = print):
    self.path = Path(path)
    self.notes: list[str] = []
    if not looks_like_torch_file(self.path):
      raise NotTorchFileError(f"{self.path} is not a torch checkpoint (neither a zip archive nor a "
                              f"pickle).")
    obj = self._load(log)
    self._tensors = flatten_tensors(obj)
    if not self._tensors:
      raise NotTorchFileError(f"{self.path} holds no tensors (top-level type "
                              f"{type(obj).__name__}).")

  def _load(self, log):
    torch = _torch()
    mmap = True
    weights_only = True
    while True:
      try:
        return torch.load(self.path, map_location="cpu", mmap=mmap, weights_only=weights_only)
      except RuntimeError as e:
        # Legacy (non-zip) files cannot be memory-mapped; they are read into memory instead.
        if mmap and "mmap" in str(e):
          mmap = False
          note = (f"{self.path.name} is a legacy (non-zip) torch file; it cannot be memory-mapped "
                  f"and is read into memory whole.")
          self.notes.append(note)
          log(note)
          continue
        raise NotTorchFileError(f"{self.path} is not a readable torch checkpoint: {e}") from e
      except pickle.UnpicklingError as e:
        if weights_only and "Weights only load failed" in str(e):
          # The checkpoint pickles objects besides tensors and plain containers (e.g. a config
          # object). Loading it runs arbitrary pickle code, so say so loudly.
          weights_only = False
          note = (f"{self.path.name} holds objects other than tensors; weights_only=True refused it, "
                  f"so it is loaded with weights_only=False (this executes pickled code: only do "
                  f"this with files you trust).")
          self.notes.append(note)
          log("WARNING: " + note)
          continue
        raise NotTorchFileError(f"{self.path} is not a readable torch checkpoint: {e}") from e
      except Exception as e:  # torch raises KeyError, EOFError, ... on files that are no pickle
        raise NotTorchFileError(f"{self.path} is not a readable torch checkpoint "
                                f"({type(e).__name__}: {e}).") from e

  def keys(self) -> list[str]:
    return list(self._tensors)

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in self._tensors[name].shape)

  def dtype(self, name: str) -> np.dtype:
    return _numpy_dtype(self._tensors[name].dtype)

  def read(self, name: str) -> np.ndarray:
    return tensor_to_numpy(self._tensors[name])
