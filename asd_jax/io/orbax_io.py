"""Orbax checkpoints of plain param trees, written from disk-backed arrays and read back in slices.

Memory is the point of this module. Measured with orbax-checkpoint 0.12 on CPU:
- The stock numpy handler deep-copies every host array before writing (`deepcopy_host_arrays=True`),
  so saving a tree of memmaps copies the whole checkpoint into anonymous memory. We register a
  `NumpyHandler(deepcopy_host_arrays=False)`: tensorstore then reads the memmap pages directly.
- The OCDBT key-value store keeps everything it writes in memory until the save commits (anonymous
  memory ~ checkpoint size, whatever the chunk size or `ocdbt_target_data_file_size`). We save with
  `use_ocdbt=False`: one zarr array per leaf, one file per chunk, written chunk by chunk.
- Chunks are at most 64 MiB, and leaves with a layer axis are chunked one layer per chunk
  (`shard_axes=(0,)`), so a layer can be read back without decoding the others (export, and
  restores into layer-sharded arrays).
Any orbax reader restores these checkpoints (`StandardCheckpointer`, `PyTreeCheckpointer`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

CHUNK_BYTES = 64 * 1024 * 1024
# tensorstore's words for a file it cannot read, e.g. 'Error reading local file "F": Truncated
# Zstd-compressed stream' (zarr) or 'Error reading "w/0" in OCDBT database at local file "D/":
# Requested byte range [0, 2299) is not valid for value of size 1283' (OCDBT).
_READ_ERROR = re.compile(r'Error (?:reading|opening|decoding) (?:"([^"]+)" in OCDBT database at )?'
                         r'(?:local )?file "([^"]+)": ([^\n]*)')


class _DropOcdbtMergeNote(logging.Filter):
  """Orbax logs "Skipping merge of OCDBT checkpoints" at WARNING on every non-OCDBT save (ours,
  on purpose: see the module docstring); the note says nothing is wrong, so it is dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropOcdbtMergeNote())


class DamagedCheckpointError(ValueError):
  """A saved checkpoint cannot be read: a file is missing, truncated or corrupt."""


def read_failure(e: BaseException) -> str:
  """'FILE: cause' of a failed read, from the chain of a tensorstore/Orbax exception (one line)."""
  seen, chain = set(), []
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for exc in chain:
    m = _READ_ERROR.search(str(exc))
    if m:
      key = f" (key {m.group(1)})" if m.group(1) else ""
      return f"{m.group(2)}{key}: {m.group(3).strip()}"
  for exc in reversed(chain):  # the root cause first
    text = " ".join(str(exc).split())
    if text:
      return f"{type(exc).__name__}: {text[:300]}"
  return type(chain[0]).__name__
# Per-layer chunks only pay off when a layer slice is not tiny (each chunk is a file).
_LAYER_CHUNK_MIN_BYTES = 1024 * 1024

PathTuple = tuple[str, ...]


def as_path(directory: str | os.PathLike) -> epath.Path:
  """An Orbax-ready path: local paths made absolute (Orbax misreads relative ones), URLs kept."""
  text = os.fspath(directory)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def leaf_name(path: PathTuple) -> str:
  return ".".join(path)


def flatten(tree: Mapping[str, Any], prefix: PathTuple = ()) -> dict[PathTuple, Any]:
  """Nested dicts -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[PathTuple, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _allocate(path: Path, size: int) -> None:
  """Creates `path` with `size` bytes reserved on disk.

  The blocks are allocated now (posix_fallocate), not when a memory-mapped page is first written:
  a sparse file on a disk that fills up kills the process with SIGBUS at that write, while a
  failed allocation here is an OSError (ENOSPC) with a message. File systems without fallocate
  get a sparse file (the CLIs check the free space before they start).
  """
  with open(path, "wb") as fh:
    if size:
      try:
        os.posix_fallocate(fh.fileno(), 0, size)
        return
      except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          raise OSError(e.errno, e.strerror, str(path)) from None
    fh.truncate(size)


class MemmapStaging:
  """One disk-backed array per leaf, filled piecewise (e.g. layer by layer), then saved.

  Each write maps only the slice it fills and unmaps it straight away, so dirty pages go to the page
  cache (written back and reclaimable) instead of accumulating in this process.
  """

  def __init__(self, folder: str | os.PathLike, specs: Mapping[PathTuple, tuple[tuple, np.dtype]]):
    self.folder = Path(folder)
    self.folder.mkdir(parents=True, exist_ok=True)
    self.specs = {p: (tuple(s), np.dtype(d)) for p, (s, d) in specs.items()}
    self.files = {}
    for i, (path, (shape, dtype)) in enumerate(self.specs.items()):
      f = self.folder / f"{i:04d}_{leaf_name(path)}.bin"
      _allocate(f, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
      self.files[path] = f

  def write(self, path: PathTuple, index: int | None, value: np.ndarray) -> None:
    """Writes `value` into leaf `path` (whole leaf when index is None, else leaf[index])."""
    shape, dtype = self.specs[path]
    sub = shape if index is None else shape[1:]
    if tuple(value.shape) != sub:
      raise ValueError(f"{leaf_name(path)}[{index}]: value shape {value.shape} != {sub}.")
    if int(np.prod(sub, dtype=np.int64)) == 0:
      return
    offset = 0 if index is None else index * int(np.prod(sub, dtype=np.int64)) * dtype.itemsize
    mm = np.memmap(self.files[path], dtype=dtype, mode="r+", offset=offset, shape=sub)
    mm[...] = value  # casts (e.g. float32 -> bfloat16, round to nearest even)
    mm.flush()
    del mm

  def arrays(self) -> dict[PathTuple, np.ndarray]:
    """Read-only memmaps of every leaf (pages are read lazily by whoever consumes them)."""
    out = {}
    for path, (shape, dtype) in self.specs.items():
      if int(np.prod(shape, dtype=np.int64)) == 0:
        out[path] = np.zeros(shape, dtype)
      else:
        out[path] = np.memmap(self.files[path], dtype=dtype, mode="r", shape=shape)
    return out


def fill_in_memory(specs: Mapping[PathTuple, tuple[tuple, np.dtype]], fill) -> dict[str, Any]:
  """`fill(write)` into numpy arrays instead of memmaps; returns the nested param tree.

  `write(path, index, value)` has `MemmapStaging.write`'s meaning: the whole leaf when index is
  None, else leaf[index].
  """
  leaves = {p: np.empty(shape, dtype) for p, (shape, dtype) in specs.items()}

  def write(path: PathTuple, index: int | None, value: np.ndarray) -> None:
    leaves[path][... if index is None else index] = value

  fill(write)
  return unflatten(leaves)


def _save_args(value: np.ndarray, stacked: bool) -> ocp.SaveArgs:
  layer_bytes = value.nbytes // max(value.shape[0], 1) if value.ndim else 0
  if stacked and value.ndim >= 2 and layer_bytes >= _LAYER_CHUNK_MIN_BYTES:
    return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,))
  return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)


def save_tree(directory: str | os.PathLike, flat: Mapping[PathTuple, np.ndarray],
              stacked: Iterable[PathTuple] = ()) -> None:
  """Saves {path: numpy array (memmaps welcome)} as an Orbax PyTree checkpoint at `directory`.

  `stacked` names the leaves whose axis 0 is a layer axis (chunked one layer per chunk).
  """
  stacked = set(stacked)
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry)
  tree = unflatten(flat)
  save_args = unflatten({p: _save_args(v, p in stacked) for p, v in flat.items()})
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(as_path(directory), args=ocp.args.PyTreeSave(tree, save_args=save_args))


@dataclasses.dataclass(frozen=True)
class LeafMeta:
  """Where and what one saved leaf is."""
  name: str  # orbax's parameter name (the key path joined by '.')
  shape: tuple[int, ...]
  dtype: np.dtype
  use_zarr3: bool


def tree_metadata(directory: str | os.PathLike) -> dict[PathTuple, LeafMeta]:
  """{path: LeafMeta} of a saved PyTree checkpoint, without reading any array data.

  Raises:
    FileNotFoundError when `directory` does not exist; DamagedCheckpointError (one line: the file
    and the cause) when its metadata cannot be read.
  """
  if not as_path(directory).exists():
    raise FileNotFoundError(f"{directory} does not exist.")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(as_path(directory)).item_metadata
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises assorted types)
    raise DamagedCheckpointError(f"{directory} is damaged: {read_failure(e)}") from e
  if meta is None or getattr(meta, "tree", None) is None:
    raise DamagedCheckpointError(f"{directory} is damaged: its tree metadata (_METADATA) is "
                                 f"missing.")
  use_zarr3 = bool(getattr(meta, "use_zarr3", False))
  return {p: LeafMeta(m.name, tuple(m.shape), np.dtype(m.dtype), use_zarr3)
          for p, m in flatten(dict(meta.tree)).items()}


def open_leaf(directory: str | os.PathLike, leaf: LeafMeta) -> ts.TensorStore:
  """A tensorstore handle on one saved leaf; index it (`t[i].read().result()`) to read slices."""
  directory = as_path(directory)
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(directory)
  info = ocp.type_handlers.ParamInfo(name=leaf.name, parent_dir=directory,
                                     is_ocdbt_checkpoint=use_ocdbt, use_zarr3=leaf.use_zarr3)
  spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
  context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
  return ts.open(ts.Spec(spec), open=True, read=True, context=context).result()


def restore(directory: str | os.PathLike, target: Any) -> Any:
  """Restores into the abstract `target` tree (jax.ShapeDtypeStruct leaves, with shardings).

  Raises:
    DamagedCheckpointError naming the file that cannot be read and why, in one line.
  """
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(as_path(directory), target)
  except Exception as e:  # pylint: disable=broad-except  (tensorstore raises assorted types)
    cause = read_failure(e)
  _drop_failed_reads()
  raise DamagedCheckpointError(f"{directory} is damaged: {cause}")


def _drop_failed_reads() -> None:
  """Silences the reports of the read coroutines a failed restore abandons.

  Python prints one "Exception ignored in <coroutine _read_array_index_and_device_put>" with a
  TensorStore spec per unread leaf when they are finalised (at exit); the cause is already in our
  one-line message, so these reports (only these) are dropped from now on.
  """
  import sys  # pylint: disable=g-import-not-at-top
  previous = sys.unraisablehook
  if getattr(previous, "_asd_jax_drops_reads", False):
    return

  def hook(unraisable):
    if getattr(getattr(unraisable, "object", None), "__name__", "") == (
        "_read_array_index_and_device_put"):
      return
    previous(unraisable)
  hook._asd_jax_drops_reads = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def restore_checked(params_dir: str | os.PathLike, abstract: Any, *, shardings: Any = None,
                    dtype: Any = None, what: str = "the model") -> Any:
  """Restores a saved param tree after checking it against the model's abstract params.

  Args:
    params_dir: an Orbax PyTree checkpoint of the params.
    abstract: the model's param tree of `jax.ShapeDtypeStruct`s (e.g. `abstract_params(cfg)`).
    shardings: None (first local device), one Sharding for every leaf, or a tree of them shaped
      like the params: each leaf is read straight into its shards.
    dtype: cast every leaf on restore (default: the stored dtype).
    what: names the model in the error message.

  Raises:
    ValueError listing every missing, unexpected and misshaped leaf.
  """
  stored = tree_metadata(params_dir)
  expected = flatten(abstract)
  problems = [f"{'/'.join(p)}: missing" for p in expected if p not in stored]
  problems += [f"{'/'.join(p)}: not part of the model" for p in stored if p not in expected]
  problems += [f"{'/'.join(p)}: stored {list(stored[p].shape)}, the model needs "
               f"{list(expected[p].shape)}" for p in expected
               if p in stored and tuple(stored[p].shape) != tuple(expected[p].shape)]
  if problems:
    raise ValueError(f"{params_dir} does not fit {what}:\n  " + "\n  ".join(problems))
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    flat_shardings = {p: shardings or default_sharding() for p in stored}
  else:
    flat_shardings = flatten(shardings)
    absent = [p for p in stored if p not in flat_shardings]
    if absent:
      raise ValueError(f"shardings has no entry for {['/'.join(p) for p in absent][:10]}.")
  target = {p: jax.ShapeDtypeStruct(m.shape, np.dtype(dtype) if dtype else m.dtype,
                                    sharding=flat_shardings[p]) for p, m in stored.items()}
  return restore(params_dir, unflatten(target))


def default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
