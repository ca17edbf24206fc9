"""Finds and opens the weights behind a `--src` path: a file, a sharded set, or a model directory.

Accepted:
- a `.safetensors` file (recognised by its header, whatever the extension);
- a `*.safetensors.index.json` (sharded safetensors);
- a torch pickle `.pt/.pth/.bin/.ckpt` (recognised by its magic bytes);
- a directory: a diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors` or
  its shards + index), a diffusers pipeline folder (its `transformer/` is used), an original Wan
  release folder (same file names, original key names), or any folder holding exactly one
  checkpoint file or one shard set.
A `config.json` next to the weights is read and handed to the caller (it carries what shapes cannot
tell, such as the number of heads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from asd_jax.io import safetensors as st
from asd_jax.io import torch_pickle

_TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
_SHARD_RE = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")
_PREFERRED_STEMS = ("diffusion_pytorch_model", "model")


class TensorReader(Protocol):
  """What the converters need from a checkpoint: names, shapes, dtypes, and one tensor at a time."""

  def keys(self) -> list[str]: ...

  def shape(self, name: str) -> tuple[int, ...]: ...

  def dtype(self, name: str) -> np.dtype: ...

  def read(self, name: str) -> np.ndarray: ...


class CheckpointNotFoundError(FileNotFoundError):
  pass


class NotACheckpointError(ValueError):
  pass


@dataclasses.dataclass
class Source:
  """An opened checkpoint. `container`: 'safetensors' | 'sharded-safetensors' | 'torch'."""
  reader: TensorReader
  container: str
  files: list[Path]
  config: dict[str, Any] | None = None
  config_path: Path | None = None
  notes: list[str] = dataclasses.field(default_factory=list)

  def describe(self) -> dict[str, Any]:
    return {"container": self.container, "files": [str(p) for p in self.files],
            "config_json": str(self.config_path) if self.config_path else None}


def _read_config(folder: Path) -> tuple[dict | None, Path | None]:
  path = folder / "config.json"
  if not path.is_file():
    return None, None
  try:
    cfg = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None, None
  return (cfg, path) if isinstance(cfg, dict) else (None, None)


def _open_file(path: Path, log: Callable[[str], None]) -> Source:
  if path.name.endswith(".index.json"):
    sharded = st.ShardedSafetensors.from_index(path)
    return Source(sharded, "sharded-safetensors", [path] + [f.path for f in sharded.files])
  try:
    return Source(st.SafetensorsFile(path), "safetensors", [path])
  except st.NotSafetensorsError as e:
    safetensors_error = e
  if torch_pickle.looks_like_torch_file(path):
    try:
      reader = torch_pickle.TorchCheckpoint(path, log=log)
    except torch_pickle.NotTorchFileError as e:
      raise NotACheckpointError(str(e)) from e
    return Source(reader, "torch", [path], notes=list(reader.notes))
  raise NotACheckpointError(f"{path} is not a checkpoint: it is neither a safetensors file "
                            f"({safetensors_error}) nor a torch pickle (no zip or pickle magic "
                            f"bytes).")


def _choose_in_folder(folder: Path) -> Path | list[Path]:
  """The checkpoint file (or list of shard files) in `folder`; raises when none or ambiguous."""
  files = sorted(p for p in folder.iterdir() if p.is_file())
  indexes = [p for p in files if p.name.endswith(".safetensors.index.json")]
  if indexes:
    preferred = [p for p in indexes if p.name.split(".")[0] in _PREFERRED_STEMS]
    pick = preferred if len(preferred) == 1 else indexes
    if len(pick) == 1:
      return pick[0]
    raise NotACheckpointError(f"{folder} holds several safetensors indexes "
                              f"{[p.name for p in indexes]}; pass one of them as --src.")
  tensors = [p for p in files if p.suffix == ".safetensors"]
  if tensors:
    singles = [p for p in tensors if not _SHARD_RE.match(p.name)]
    preferred = [p for p in singles if p.stem in _PREFERRED_STEMS]
    if len(preferred) == 1:
      return preferred[0]
    if len(tensors) == 1:
      return tensors[0]
    shard_sets = {_SHARD_RE.match(p.name).group(1, 3) for p in tensors if _SHARD_RE.match(p.name)}
    if not singles and len(shard_sets) == 1:
      (_, total), = shard_sets
      if len(tensors) != int(total):
        raise NotACheckpointError(f"{folder} has {len(tensors)} of {int(total)} shards and no "
                                  f"index; shards are missing.")
      return tensors  # shards without an index: their union
    raise NotACheckpointError(f"{folder} holds several safetensors files "
                              f"{[p.name for p in tensors]}; pass one (or an index) as --src.")
  pickles = [p for p in files if p.suffix in _TORCH_EXTS]
  if len(pickles) == 1:
    return pickles[0]
  if pickles:
    raise NotACheckpointError(f"{folder} holds several torch files {[p.name for p in pickles]}; "
                              f"pass one of them as --src.")
  raise NotACheckpointError(f"{folder} holds no checkpoint (no *.safetensors, "
                            f"*.safetensors.index.json or {'/'.join(_TORCH_EXTS)} files).")


def open_checkpoint(src: str | os.PathLike, log: Callable[[str], None] = print) -> Source:
  """Opens `src` (file or directory, see the module docstring) without reading tensor data."""
  path = Path(src).expanduser()
  if not path.exists():
    raise CheckpointNotFoundError(f"--src {src} does not exist.")
  if path.is_dir():
    folder = path
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
      log(f"{folder} is a diffusers pipeline; converting its transformer/ folder.")
      folder = folder / "transformer"
    chosen = _choose_in_folder(folder)
    if isinstance(chosen, list):
      source = Source(st.ShardedSafetensors(chosen), "sharded-safetensors", chosen)
    else:
      source = _open_file(chosen, log)
  else:
    folder = path.parent
    source = _open_file(path, log)
  source.config, source.config_path = _read_config(folder)
  return source
