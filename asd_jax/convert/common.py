"""Pieces every converter shares: errors, wrapper-prefix stripping, picking a training checkpoint's
sub-dict, outputs that appear whole or not at all, listings, progress, in-memory readers."""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from asd_jax.io import atomic

# Module wrappers that training code puts anywhere in a key (FSDP, activation checkpointing,
# torch.compile); dropped wherever they occur.
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
# Leading components that wrap the whole network: `model.` (Self Forcing / CausVid wrappers),
# `model.diffusion_model.` (ComfyUI), `module.` (DDP). Stripped from the front only.
LEADING_WRAPPERS = ("model", "module", "diffusion_model")
# Which sub-dict of a training checkpoint to convert when --key is not given, best first.
SUBDICT_PREFERENCE = ("generator_ema", "generator", "model", "ema", "state_dict", "module", "net",
                      "critic")


class ConversionError(ValueError):
  """The input cannot be converted; the message says what is wrong and what to do."""


def log_stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def quiet(msg: str) -> None:
  del msg


def split_wrappers(name: str, roots: Iterable[str]) -> tuple[str, str]:
  """(key without wrapper components, the removed wrappers as text such as 'model._orig_mod.')."""
  parts = name.split(".")
  removed = [p for p in parts if p in WRAPPER_COMPONENTS]
  parts = [p for p in parts if p not in WRAPPER_COMPONENTS]
  lead = []
  while len(parts) > 1 and parts[0] not in roots and parts[0] in LEADING_WRAPPERS:
    lead.append(parts.pop(0))
  return ".".join(parts), "".join(p + "." for p in lead + removed)


def strip_wrappers(name: str, roots: Iterable[str]) -> str:
  """Removes wrapper components from a key, keeping the part that starts at a network root."""
  return split_wrappers(name, roots)[0]


@dataclasses.dataclass
class Selection:
  """The tensors picked from a checkpoint and how their names were cleaned."""
  names: dict[str, str]  # cleaned name -> name in the checkpoint
  key: str | None  # sub-dict that was used, None for a plain state dict
  candidates: list[str]  # sub-dicts that hold network weights
  stripped_prefixes: list[str]
  notes: list[str]


def select_weights(names: Iterable[str], roots: Iterable[str], *, key: str | None = None,
                   require_subdict: bool = False, what: str = "network",
                   log=log_stderr) -> Selection:
  """Picks the network's tensors from a flat list of checkpoint keys and strips wrapper prefixes.

  A plain state dict has keys that start (after wrappers) at a network root. A training checkpoint
  nests several state dicts (`generator`, `generator_ema`, `critic`, ...): `key` names the one to
  use; without it the first of SUBDICT_PREFERENCE that is present wins, and the choice is logged.

  Raises:
    ConversionError: `key` is not a sub-dict, no sub-dict holds weights, several do and none is in
      the preference list, or two keys collapse to the same name once wrappers are stripped.
  """
  names = list(names)
  roots = set(roots)
  groups: dict[str, list[str]] = collections.OrderedDict()
  for n in names:
    groups.setdefault(n.split(".")[0], []).append(n)

  def holds_weights(group: str) -> bool:
    return any(strip_wrappers(n[len(group) + 1:], roots).split(".")[0] in roots
               for n in groups[group] if "." in n)

  candidates = [g for g in groups if g not in roots and holds_weights(g)]
  plain = any(strip_wrappers(n, roots).split(".")[0] in roots for n in names)
  notes = []
  if key is not None:
    key = key.strip(".")
    chosen = [n for n in names if n.startswith(key + ".")]
    if not chosen:
      listing = candidates or list(groups)
      raise ConversionError(f"--key {key!r} is not a sub-dict of this checkpoint; the sub-dicts "
                            f"holding {what} weights are {listing}.")
  elif plain and not require_subdict:
    chosen, key = names, None
  else:
    if not candidates:
      shown = list(groups)[:20]
      if require_subdict:
        raise ConversionError(f"--format=training, but no sub-dict of this checkpoint holds {what} "
                              f"weights (top-level entries: {shown}).")
      raise ConversionError(f"found no {what} weights: no key starts at one of {sorted(roots)} "
                            f"and no sub-dict holds such keys (top-level entries: {shown}).")
    preferred = [c for c in SUBDICT_PREFERENCE if c in candidates]
    if preferred:
      key = preferred[0]
    elif len(candidates) == 1:
      key = candidates[0]
    else:
      raise ConversionError(f"the checkpoint holds several sub-dicts with {what} weights "
                            f"{candidates}; choose one with --key.")
    if len(candidates) > 1:
      order = " > ".join(c for c in SUBDICT_PREFERENCE)
      notes.append(f"checkpoint sub-dicts with weights: {candidates}; using {key!r} (preference "
                   f"{order}; choose another with --key).")
    else:
      notes.append(f"using sub-dict {key!r}.")
    chosen = [n for n in names if n.startswith(key + ".")]

  cleaned: dict[str, str] = {}
  prefixes = collections.Counter()
  for n in chosen:
    inner = n[len(key) + 1:] if key else n
    c, removed = split_wrappers(inner, roots)
    if c in cleaned:
      raise ConversionError(f"keys {cleaned[c]!r} and {n!r} both become {c!r} once wrapper "
                            f"prefixes are stripped; the checkpoint holds two copies.")
    cleaned[c] = n
    if removed:
      prefixes[removed] += 1
  if prefixes:
    notes.append("stripped wrapper prefixes: " +
                 ", ".join(f"{p!r} ({k} keys)" for p, k in prefixes.most_common()))
  for note in notes:
    log(note)
  return Selection(cleaned, key, candidates, sorted(prefixes), notes)


# ----------------------------------------------------------------------------------------------
# Outputs that appear whole or not at all.


def check_destination(dst: str | os.PathLike, overwrite: bool, *, is_dir: bool = True,
                      src: str | os.PathLike | None = None) -> Path:
  """Refuses an existing non-empty destination unless `overwrite`, and one equal to, inside or
  containing `src` (whatever `overwrite` says). Returns the absolute path."""
  dst = Path(dst).expanduser().absolute()
  if src is not None:
    try:
      atomic.check_disjoint(src, dst)
    except atomic.DestinationError as e:
      raise ConversionError(str(e)) from None
  if dst.exists():
    if is_dir and not dst.is_dir():
      raise ConversionError(f"--dst {dst} exists and is not a directory.")
    if not is_dir and dst.is_dir():
      raise ConversionError(f"--dst {dst} is a directory; give a file name.")
    if not overwrite and (not is_dir or any(dst.iterdir())):
      raise ConversionError(f"--dst {dst} already exists{' and is not empty' if is_dir else ''}; "
                            f"pass --overwrite to replace it.")
  return dst


def check_space(dst: Path, specs: Mapping[Any, tuple[tuple, np.dtype]], what: str, *,
                staging: bool = True) -> int:
  """Refuses to start when the disk at `dst` cannot hold the output (and its staging copy).

  `specs` maps leaves to (shape, dtype) of what is written; the memory-mapped staging arrays take
  as much again until Orbax has written them. Returns the bytes needed.
  """
  size = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
             for shape, dtype in specs.values())
  need = size * (2 if staging else 1)
  try:
    atomic.check_free_space(dst, need, what)
  except atomic.DestinationError as e:
    raise ConversionError(str(e)) from None
  return need


# The temporary-sibling writes live in asd_jax.io.atomic (every writer of the project uses them).
atomic_directory = atomic.atomic_directory
atomic_file = atomic.atomic_file


def is_float(dtype: np.dtype) -> bool:
  if dtype.kind == "f":
    return True
  try:  # ml_dtypes types (bfloat16, float8_*) have kind 'V'
    ml_dtypes.finfo(dtype)
    return True
  except ValueError:
    return False


def fmt_shape(shape) -> str:
  return "[" + ", ".join(str(s) for s in shape) + "]"


def listing(title: str, items: list[str], limit: int = 40) -> str:
  shown = "\n    ".join(items[:limit])
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n    {shown}{more}"


def progress(total: int, desc: str, log):
  """A tqdm bar on a terminal (stderr), nothing otherwise. Call with a count, None to close."""
  if log is quiet:
    return lambda n: None
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return lambda n: None
  bar = tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=None, leave=False)

  def update(n):
    if n is None:
      bar.close()
    else:
      bar.update(n)
  return update


class MappingReader:
  """A TensorReader over an in-memory mapping of numpy arrays or torch tensors (nested allowed)."""

  def __init__(self, state: Mapping[str, Any]):
    self._t: dict[str, Any] = {}

    def walk(obj, prefix):
      for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
          walk(v, name)
        elif hasattr(v, "shape") and hasattr(v, "dtype"):
          self._t[name] = v
    walk(state, "")

  def keys(self):
    return list(self._t)

  def _np(self, v) -> np.ndarray:
    if type(v).__module__.startswith("torch"):
      from asd_jax.io import torch_pickle  # pylint: disable=g-import-not-at-top
      return torch_pickle.tensor_to_numpy(v)
    return np.asarray(v)

  def shape(self, name):
    return tuple(int(s) for s in self._t[name].shape)

  def dtype(self, name):
    v = self._t[name]
    return self._np(v).dtype if type(v).__module__.startswith("torch") else np.dtype(v.dtype)

  def read(self, name):
    return self._np(self._t[name])
