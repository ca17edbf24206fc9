"""A small safetensors reader and writer on numpy, with no torch and no whole-file loads.

File layout: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes; offsets count from the end of the header.

Reading maps one tensor at a time with `np.memmap`, so a 57 GB checkpoint costs page cache (which the
kernel can reclaim), not process memory. Writing takes the whole table of names, shapes and dtypes
first (the header precedes the data) and then one array at a time from a callback.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

# safetensors dtype code <-> numpy dtype. Little-endian throughout.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in DTYPES.items()}

# A real header is a few hundred kB; anything far larger means the file is something else.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class NotSafetensorsError(ValueError):
  """The file does not have a valid safetensors header."""


def dtype_code(dtype: np.dtype) -> str:
  """numpy dtype -> safetensors code ('F32', 'BF16', ...)."""
  dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
  if dtype not in _CODES:
    raise ValueError(f"dtype {dtype} has no safetensors code; supported: {sorted(_CODES.values())}.")
  return _CODES[dtype]


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
  """Returns (header dict, byte offset of the data section). Raises NotSafetensorsError."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise NotSafetensorsError(f"{path} is {size} bytes, too short to be a safetensors file.")
    (n,) = struct.unpack("<Q", raw)
    if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
      raise NotSafetensorsError(f"{path} is not a safetensors file (its first 8 bytes do not give a "
                                f"plausible header length: {n} for a {size}-byte file).")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise NotSafetensorsError(f"{path} is not a safetensors file (header is not JSON: {e}).")
  if not isinstance(header, dict):
    raise NotSafetensorsError(f"{path} is not a safetensors file (header is not a JSON object).")
  data_start = 8 + n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
      raise NotSafetensorsError(f"{path}: header entry '{name}' lacks dtype/shape/data_offsets.")
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{path}: tensor '{name}' has dtype {info['dtype']}, which this reader does "
                       f"not support ({sorted(DTYPES)}).")
    begin, end = info["data_offsets"]
    nbytes = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
    if end - begin != nbytes or data_start + end > size:
      raise NotSafetensorsError(f"{path}: tensor '{name}' has data_offsets {info['data_offsets']} "
                                f"that do not fit its shape {info['shape']} or the file size.")
  return header, data_start


class SafetensorsFile:
  """Lazy view of one .safetensors file: names, shapes and dtypes from the header; data on demand."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    header, self._data_start = read_header(self.path)
    self.metadata: dict = header.pop("__metadata__", None) or {}
    # Keep file order: reading in offset order walks the file front to back.
    self._entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]["dtype"]]

  def read(self, name: str) -> np.ndarray:
    """A read-only memmap of tensor `name` (drop it when done so its pages can be unmapped)."""
    info = self._entries[name]
    shape = self.shape(name)
    if int(np.prod(shape, dtype=np.int64)) == 0:
      return np.zeros(shape, self.dtype(name))
    return np.memmap(self.path, dtype=self.dtype(name), mode="r",
                     offset=self._data_start + info["data_offsets"][0], shape=shape)


class ShardedSafetensors:
  """Several .safetensors files seen as one (from a `*.safetensors.index.json` or a file list)."""

  def __init__(self, files: Iterable[str | os.PathLike], index_path: str | os.PathLike | None = None):
    self.files = [SafetensorsFile(p) for p in files]
    self.index_path = Path(index_path) if index_path else None
    self._where: dict[str, SafetensorsFile] = {}
    for f in self.files:
      for name in f.keys():
        if name in self._where:
          raise ValueError(f"tensor '{name}' appears in both {self._where[name].path.name} and "
                           f"{f.path.name}.")
        self._where[name] = f

  @classmethod
  def from_index(cls, index_path: str | os.PathLike) -> "ShardedSafetensors":
    index_path = Path(index_path)
    try:
      index = json.loads(index_path.read_text())
      weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise NotSafetensorsError(f"{index_path} is not a safetensors index (expected JSON with a "
                                f"'weight_map'): {e}")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index_path.parent / f).exists()]
    if missing:
      raise FileNotFoundError(f"{index_path} names shard files that are not there: {missing}.")
    sharded = cls([index_path.parent / f for f in files], index_path)
    # The index must describe the shards exactly; a stale index would silently drop tensors.
    listed, found = set(weight_map), set(sharded._where)
    if listed != found:
      raise ValueError(f"{index_path} does not match its shards: listed but absent "
                       f"{sorted(listed - found)[:10]}, present but unlisted "
                       f"{sorted(found - listed)[:10]}.")
    return sharded

  def keys(self) -> list[str]:
    return [n for f in self.files for n in f.keys()]

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._where[name].dtype(name)

  def read(self, name: str) -> np.ndarray:
    return self._where[name].read(name)


def write_streaming(path: str | os.PathLike,
                    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                    produce: Callable[[str], np.ndarray],
                    metadata: Mapping[str, str] | None = None,
                    progress: Callable[[str], None] | None = None) -> None:
  """Writes a safetensors file one tensor at a time.

  Args:
    path: output file (written in place; callers wanting atomicity write a temp name and rename).
    specs: name -> (shape, dtype), in the order the data is laid out.
    produce: called once per name in `specs` order; returns the array (shape and dtype must match).
    metadata: optional string -> string `__metadata__`.
    progress: optional callback after each tensor.
  """
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for name, (shape, dtype) in specs.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_code(dtype), "shape": [int(s) for s in shape],
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the reference implementation aligns the data section to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, (shape, dtype) in specs.items():
      arr = produce(name)
      if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"tensor '{name}' came as {arr.dtype}{list(arr.shape)}, the header says "
                         f"{np.dtype(dtype)}{list(shape)}.")
      arr = np.ascontiguousarray(arr)
      if arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))
      del arr
      if progress:
        progress(name)
