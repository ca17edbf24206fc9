"""Wan 2.1 DiT: PyTorch checkpoints -> Orbax param trees, and back to original Wan safetensors.

    cfg = convert(src, dst)                       # what `python -m asd_jax.convert wan` runs
    cfg, params = state_dict_to_params(state)     # in memory, for tests and small models
    export_wan(dst, "out.safetensors")            # what `python -m asd_jax.convert export-wan` runs

Conversion streams: names, shapes and dtypes are read first (nothing else), the architecture is
inferred from the shapes, every key is checked against `wan.abstract_params(cfg)`, and only then is
data read, one tensor at a time, into a disk-backed array per output leaf (stacked leaves filled
layer by layer) that Orbax saves from disk. Memory stays near one tensor plus page cache the kernel
can reclaim; see `benchmarks/convert_memory.py` for measured figures.

Output directory layout:
  DIR/config.json  {"kind": "wan", "config": WanConfig.to_dict(), "source": {...}}
  DIR/params/      Orbax PyTree checkpoint of the param tree (restore with any orbax checkpointer)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from asd_jax.convert import common
from asd_jax.convert import wan_keys
from asd_jax.convert.common import ConversionError
from asd_jax.convert.wan_infer import infer_config
from asd_jax.io import orbax_io
from asd_jax.io import safetensors as st
from asd_jax.io import sources
from asd_jax.models import wan

FORMATS = ("auto", "original", "diffusers", "training")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# Planning: which source tensor goes where. Reads names, shapes and dtypes only.


@dataclasses.dataclass
class Plan:
  cfg: wan.WanConfig
  keys: dict[str, wan_keys.KeySpec]  # original key -> placement, in checkpoint order
  source_names: dict[str, str]  # original key -> name in the checkpoint
  naming: str  # 'original' | 'diffusers'
  selection: common.Selection
  info: dict[str, Any]


def make_plan(reader: sources.TensorReader, *, fmt: str = "auto", key: str | None = None,
              num_heads: int | None = None, config_json: Mapping | None = None,
              dtype: str = "float32", log: Log = common.log_stderr) -> Plan:
  """Maps every tensor of `reader` onto the Wan param tree, or raises listing what does not fit."""
  if fmt not in FORMATS:
    raise ConversionError(f"--format must be one of {FORMATS}, got {fmt!r}.")
  selection = common.select_weights(reader.keys(), wan_keys.ROOTS, key=key,
                                    require_subdict=fmt == "training", what="Wan DiT", log=log)
  naming = fmt if fmt in ("original", "diffusers") else wan_keys.detect_naming(selection.names)
  if naming is None:
    raise ConversionError("cannot tell whether the keys use original Wan names or diffusers names "
                          f"(first keys: {list(selection.names)[:6]}); pass --format=original or "
                          "--format=diffusers.")
  canonical: dict[str, str] = {}  # original key (or the cleaned name when unmappable) -> source
  for name, src in selection.names.items():
    orig = wan_keys.diffusers_to_original(name) if naming == "diffusers" else name
    canonical[orig if orig is not None else name] = src
  shapes = {n: reader.shape(s) for n, s in canonical.items()}
  cfg, info = infer_config(shapes, config_json, num_heads, dtype, log)
  expected = wan_keys.expected_keys(cfg)

  def in_users_names(n: str) -> str:  # a missing key as the checkpoint would name it
    theirs = wan_keys.original_to_diffusers(n) if naming == "diffusers" else None
    return f"{theirs} (original name {n})" if theirs and theirs != n else n

  missing = [f"{in_users_names(n)} {common.fmt_shape(spec.torch_shape)}"
             for n, spec in expected.items() if n not in canonical]
  unexpected, misshaped, bad_dtype = [], [], []
  for n, src in canonical.items():
    shown = n if src == n else f"{n} (in the checkpoint: {src})"
    if n not in expected:
      unexpected.append(f"{shown} {common.fmt_shape(shapes[n])}")
    elif tuple(shapes[n]) != tuple(expected[n].torch_shape):
      misshaped.append(f"{shown} is {common.fmt_shape(shapes[n])}, expected "
                       f"{common.fmt_shape(expected[n].torch_shape)}")
    elif not common.is_float(reader.dtype(src)):
      bad_dtype.append(f"{shown} has dtype {reader.dtype(src)}, expected a float type")
  if missing or unexpected or misshaped or bad_dtype:
    parts = [f"cannot map the checkpoint completely onto the Wan DiT (inferred {naming} names, "
             f"dim={cfg.dim}, ffn_dim={cfg.ffn_dim}, num_layers={cfg.num_layers}, "
             f"qk_norm={cfg.qk_norm}, cross_attn_norm={cfg.cross_attn_norm}"
             + (f", sub-dict {selection.key!r}" if selection.key else "") + "):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("misshaped", misshaped), ("wrong dtype", bad_dtype)):
      if items:
        parts.append(common.listing(title, items))
    raise ConversionError("\n".join(parts))
  order = {src: i for i, src in enumerate(reader.keys())}
  ordered = sorted(expected, key=lambda n: order[canonical[n]])  # read the file front to back
  return Plan(cfg, {n: expected[n] for n in ordered}, {n: canonical[n] for n in ordered}, naming,
              selection, info)


def _fill(reader: sources.TensorReader, plan: Plan, write: Callable, log: Log) -> None:
  """Reads every planned tensor once and writes it, in JAX layout, to its leaf (slot)."""
  total = sum(int(np.prod(s.torch_shape)) for s in plan.keys.values())
  bar = common.progress(total, "convert", log)
  for name, spec in plan.keys.items():
    arr = reader.read(plan.source_names[name])
    write(spec.path, spec.layer, wan_keys.to_jax(arr, spec.layout))
    del arr  # unmaps the source pages of this tensor
    bar(int(np.prod(spec.torch_shape)))
  bar(None)


def _leaf_specs(cfg: wan.WanConfig, dtype: np.dtype) -> dict[tuple[str, ...], tuple]:
  return {p: (tuple(l.shape), dtype)
          for p, l in orbax_io.flatten(wan.abstract_params(cfg)).items()}


# ----------------------------------------------------------------------------------------------
# Public API.


def state_dict_to_params(state: Mapping[str, Any], num_heads: int | None = None,
                         config_json: Mapping[str, Any] | None = None, *, fmt: str = "auto",
                         key: str | None = None, dtype: str = "float32",
                         verbose: bool = False) -> tuple[wan.WanConfig, dict[str, Any]]:
  """In-memory conversion of a Wan state dict (original, diffusers or training-checkpoint names).

  Args:
    state: name -> numpy array or torch tensor (nested dicts allowed, e.g. {'generator': {...}}).
    num_heads: heads, when `config_json` does not say (default dim // 128).
    config_json: the model's config.json contents (diffusers or original), if any.
    fmt, key, dtype: as for `convert`.

  Returns:
    (WanConfig, params) with params a nested dict of numpy arrays shaped like
    `wan.abstract_params(cfg)` (kernels [in, out], stacked blocks [num_layers, ...]).
  """
  log = common.log_stderr if verbose else common.quiet
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  reader = common.MappingReader(state)
  plan = make_plan(reader, fmt=fmt, key=key, num_heads=num_heads, config_json=config_json,
                   dtype=dtype, log=log)
  params = orbax_io.fill_in_memory(_leaf_specs(plan.cfg, DTYPES[dtype]),
                                   lambda write: _fill(reader, plan, write, log))
  return plan.cfg, params


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "auto",
            key: str | None = None, dtype: str = "float32", num_heads: int | None = None,
            overwrite: bool = False, verbose: bool = True) -> wan.WanConfig:
  """Converts a PyTorch Wan DiT checkpoint into DIR/config.json + DIR/params (Orbax).

  Args:
    src: a safetensors file, a `*.safetensors.index.json`, a .pt/.pth pickle (plain or a training
      checkpoint with generator/generator_ema/critic sub-dicts), or a diffusers / original Wan
      model directory.
    dst: output directory; must not exist or be empty unless `overwrite`.
    fmt: 'auto' | 'original' | 'diffusers' (key naming) | 'training' (pick a sub-dict; naming
      auto-detected).
    key: sub-dict of a training checkpoint (default: generator_ema, generator, model, ... in
      `common.SUBDICT_PREFERENCE` order; the choice is printed).
    dtype: stored param dtype, 'float32' or 'bfloat16'.
    num_heads: when no config.json next to the weights says (default dim // 128).
    overwrite: replace a non-empty `dst`.
    verbose: print notes and a progress bar to stderr.

  Disk: besides the output, the staging arrays (the output's size in `dtype`) live in a temporary
  sibling of `dst` until Orbax has written them.

  Returns:
    The WanConfig written to config.json.
  Raises:
    ConversionError (a ValueError) listing missing / unexpected / misshaped keys, or naming the
    problem with the input; FileNotFoundError for a missing src. Nothing is left at `dst` or beside
    it on failure.
  """
  log = common.log_stderr if verbose else common.quiet
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  dst = common.check_destination(dst, overwrite, src=src)
  try:
    source = sources.open_checkpoint(src, log)
  except ValueError as e:  # not a checkpoint, a bad index, ...: say what, without a traceback
    raise ConversionError(str(e)) from e
  plan = make_plan(source.reader, fmt=fmt, key=key, num_heads=num_heads, config_json=source.config,
                   dtype=dtype, log=log)
  log(f"converting {len(plan.keys)} tensors ({plan.naming} names) into WanConfig(dim={plan.cfg.dim}, "
      f"heads={plan.cfg.num_heads}, layers={plan.cfg.num_layers}) as {dtype} -> {dst}")
  specs = _leaf_specs(plan.cfg, DTYPES[dtype])
  common.check_space(dst, specs, "the wan conversion")
  with common.atomic_directory(dst) as tmp:
    staging = orbax_io.MemmapStaging(tmp / ".staging", specs)
    _fill(source.reader, plan, staging.write, log)
    log("writing the Orbax checkpoint")
    orbax_io.save_tree(tmp / PARAMS_DIR, staging.arrays(),
                       stacked=[p for p in specs if p[0] == "blocks"])
    shutil.rmtree(tmp / ".staging")
    source_dtypes = collections.Counter(str(source.reader.dtype(s))
                                        for s in plan.source_names.values())
    meta = {
        "kind": "wan",
        "config": plan.cfg.to_dict(),
        "source": {
            "path": str(Path(src).expanduser().absolute()),
            **source.describe(),
            "format": fmt,
            "naming": plan.naming,
            "key": plan.selection.key,
            "subdicts_with_weights": plan.selection.candidates,
            "stripped_prefixes": plan.selection.stripped_prefixes,
            "num_tensors": len(plan.keys),
            "source_dtypes": dict(source_dtypes),
            "dtype": dtype,
            **plan.info,
            "notes": source.notes + plan.selection.notes,
        },
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
  log(f"wrote {dst}")
  return plan.cfg


def read_converted(directory: str | os.PathLike) -> tuple[dict[str, Any], wan.WanConfig]:
  """(config.json contents, WanConfig) of a directory written by `convert`."""
  directory = Path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise ConversionError(f"{directory} has no {CONFIG_FILE}; it was not written by "
                          f"`python -m asd_jax.convert`.")
  meta = json.loads(path.read_text())
  if meta.get("kind") != "wan":
    raise ConversionError(f"{path} describes a {meta.get('kind')!r} checkpoint, not 'wan'.")
  return meta, wan.WanConfig.from_dict(meta["config"])


def export_wan(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
               overwrite: bool = False, verbose: bool = True) -> list[str]:
  """Writes a converted (or trained) Wan DiT back as one safetensors file with original keys.

  Streams: each tensor is read from the Orbax checkpoint (one layer slice of a stacked leaf at a
  time), put back in torch layout and appended to the file. The file appears atomically.

  Args:
    src: a directory with config.json (kind 'wan') and params/.
    dst: the .safetensors file to write.
    dtype: None keeps the stored dtype; 'float32' or 'bfloat16' casts.
    overwrite: replace an existing `dst`.

  Returns:
    The original key names written, in file order.
  """
  log = common.log_stderr if verbose else common.quiet
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  src = Path(src).expanduser()
  if not src.exists():
    raise FileNotFoundError(f"--src {src} does not exist.")
  dst = common.check_destination(dst, overwrite, is_dir=False, src=src)
  _, cfg = read_converted(src)
  leaves = orbax_io.tree_metadata(src / PARAMS_DIR)
  expected = orbax_io.flatten(wan.abstract_params(cfg))
  problems = [f"{'/'.join(p)}: missing" for p in expected if p not in leaves]
  problems += [f"{'/'.join(p)}: unexpected" for p in leaves if p not in expected]
  problems += [f"{'/'.join(p)}: {list(leaves[p].shape)}, expected {list(expected[p].shape)}"
               for p in expected if p in leaves and tuple(leaves[p].shape) != expected[p].shape]
  if problems:
    raise ConversionError(f"{src / PARAMS_DIR} does not match its config.json:\n  " +
                          "\n  ".join(problems))
  keys = wan_keys.expected_keys(cfg)
  out_dtype = {n: DTYPES[dtype] if dtype else leaves[s.path].dtype for n, s in keys.items()}
  specs = {n: (s.torch_shape, out_dtype[n]) for n, s in keys.items()}
  stores: dict[tuple[str, ...], Any] = {}
  common.check_space(dst, specs, "the safetensors export", staging=False)
  bar = common.progress(sum(int(np.prod(s.torch_shape)) for s in keys.values()), "export", log)

  def produce(name: str) -> np.ndarray:
    spec = keys[name]
    if spec.path not in stores:
      stores[spec.path] = orbax_io.open_leaf(src / PARAMS_DIR, leaves[spec.path])
    store = stores[spec.path]
    value = (store if spec.layer is None else store[spec.layer]).read().result()
    value = np.ascontiguousarray(wan_keys.to_torch(value, spec.layout)).astype(out_dtype[name],
                                                                               copy=False)
    bar(value.size)
    return value

  with common.atomic_file(dst) as tmp:
    st.write_streaming(tmp, specs, produce, metadata={"format": "pt"})
  bar(None)
  log(f"wrote {len(specs)} tensors to {dst}")
  return list(specs)
