"""umT5 text encoder: PyTorch checkpoints -> Orbax param trees, and loading them back.

    python -m asd_jax.convert umt5 --src=models_t5_umt5-xxl-enc-bf16.pth --dst=ckpt/umt5
    cfg = convert(src, dst)                       # what the command line runs
    cfg, params = state_dict_to_params(state)     # in memory, for tests and small models
    module, params = load_converted(dst)          # what asd_jax.pretrained.load calls for "umt5"

Accepted names:
- Wan's `models_t5_umt5-xxl-enc-bf16.pth` (the `T5Encoder` of wan/modules/t5.py): token_embedding,
  blocks.i.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}, norm;
- Hugging Face `UMT5EncoderModel` (a folder with config.json + model.safetensors, sharded or not):
  shared / encoder.embed_tokens (the same tied table; either or both), encoder.block.i.layer.0.
  {layer_norm, SelfAttention.{q,k,v,o,relative_attention_bias}}, encoder.block.i.layer.1.
  {layer_norm, DenseReluDense.{wi_0 (gate), wi_1 (fc1), wo (fc2)}}, encoder.final_layer_norm.
  A full encoder-decoder checkpoint converts its encoder with `--encoder_only`.

Conversion streams as the DiT converter does: names, shapes and dtypes first, the architecture from
the shapes (and config.json when it is a T5 config), every key checked, then data one tensor at a
time into disk-backed staging arrays that Orbax saves. Nothing is written unless everything maps.

Output directory layout:
  DIR/config.json  {"kind": "umt5", "config": UMT5Config.to_dict(), "source": {...}}
  DIR/params/      Orbax PyTree checkpoint of the param tree (see asd_jax.models.umt5)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from asd_jax.convert import common
from asd_jax.convert.common import ConversionError
from asd_jax.io import orbax_io
from asd_jax.io import sources
from asd_jax.models import umt5

HELP = "umT5 text encoder (Wan .pth or Hugging Face UMT5EncoderModel) -> DIR/config.json + params."
KIND = "umt5"
FORMATS = ("auto", "original", "hf")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

Log = Callable[[str], None]
PathTuple = tuple[str, ...]

ORIGINAL_ROOTS = frozenset({"token_embedding", "blocks", "norm"})
HF_ROOTS = frozenset({"shared", "encoder", "decoder", "lm_head"})
ROOTS = ORIGINAL_ROOTS | HF_ROOTS
_EMBEDDING = "token_embedding.weight"
# Tied copies of the embedding in Hugging Face checkpoints, preferred first.
_HF_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
_HF_TOP = {"encoder.final_layer_norm.weight": "norm.weight"}
_HF_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------
# Names and layouts.


@dataclasses.dataclass(frozen=True)
class KeySpec:
  """Where one original (Wan) key goes: leaf path, layer index (None: whole leaf), torch shape."""
  path: PathTuple
  layer: int | None
  transpose: bool  # torch Linear [out, in] -> kernel [in, out]
  torch_shape: tuple[int, ...]


def expected_keys(cfg: umt5.UMT5Config) -> dict[str, KeySpec]:
  """Every original key of an encoder with this config, in Wan's state-dict order."""
  D, F, HK = cfg.d_model, cfg.d_ff, cfg.inner_dim
  out = {_EMBEDDING: KeySpec(("token_embedding", "embedding"), None, False, (cfg.vocab_size, D))}
  for i in range(cfg.num_layers):
    b = f"blocks.{i}."
    for name, path, t, shape in (
        ("norm1.weight", ("norm1", "scale"), False, (D,)),
        ("attn.q.weight", ("attn", "q", "kernel"), True, (HK, D)),
        ("attn.k.weight", ("attn", "k", "kernel"), True, (HK, D)),
        ("attn.v.weight", ("attn", "v", "kernel"), True, (HK, D)),
        ("attn.o.weight", ("attn", "o", "kernel"), True, (D, HK)),
        ("norm2.weight", ("norm2", "scale"), False, (D,)),
        ("ffn.gate.0.weight", ("ffn", "gate", "kernel"), True, (F, D)),
        ("ffn.fc1.weight", ("ffn", "fc1", "kernel"), True, (F, D)),
        ("ffn.fc2.weight", ("ffn", "fc2", "kernel"), True, (D, F)),
        ("pos_embedding.embedding.weight", ("pos_embedding", "embedding"), False,
         (cfg.relative_attention_num_buckets, cfg.num_heads)),
    ):
      out[b + name] = KeySpec(("blocks",) + path, i, t, shape)
  out["norm.weight"] = KeySpec(("norm", "scale"), None, False, (D,))
  return out


def hf_to_original(name: str) -> str | None:
  """The Wan name of a Hugging Face UMT5 encoder key, None when it has none."""
  if name in _HF_EMBEDDINGS:
    return _EMBEDDING
  if name in _HF_TOP:
    return _HF_TOP[name]
  m = _HF_BLOCK_RE.match(name)
  if m and m.group(2) in _HF_BLOCK:
    return f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
  return None


def detect_naming(names) -> str | None:
  """'original' (Wan), 'hf' (Hugging Face) or None when neither or both."""
  names = list(names)
  original = any(n.split(".")[0] in ORIGINAL_ROOTS for n in names)
  hf = any(n.split(".")[0] in HF_ROOTS for n in names)
  return None if original == hf else ("original" if original else "hf")


# ----------------------------------------------------------------------------------------------
# Architecture from shapes.


def _text_config(config_json: Mapping[str, Any] | None, log: Log) -> dict[str, Any]:
  """The config.json when it describes a T5-family model (a Wan release folder also holds the
  DiT's config.json next to the .pth, which says nothing about the text encoder)."""
  if not config_json:
    return {}
  if config_json.get("model_type") not in ("umt5", "t5", "mt5") and "d_model" not in config_json:
    log("ignoring the config.json next to the weights: it does not describe a T5-family model.")
    return {}
  model_type = config_json.get("model_type", "umt5")
  if model_type != "umt5":
    raise ConversionError(f"config.json says model_type={model_type!r}; only umT5 (a separate "
                          f"relative position bias in every layer) is supported.")
  proj = config_json.get("feed_forward_proj", "gated-gelu")
  if proj != "gated-gelu":
    raise ConversionError(f"config.json says feed_forward_proj={proj!r}; umT5 (and this encoder) "
                          f"uses a gated GELU (tanh) FFN, 'gated-gelu'.")
  return dict(config_json)


def infer_config(shapes: Mapping[str, tuple[int, ...]], config_json: Mapping[str, Any] | None,
                 dtype: str, log: Log) -> tuple[umt5.UMT5Config, dict[str, Any]]:
  """UMT5Config from original-name shapes (config.json fills in what shapes cannot tell)."""
  cj = _text_config(config_json, log)

  def dim(suffix: str, axis: int) -> int | None:
    for n, s in shapes.items():
      if (n == suffix or n.endswith("." + suffix)) and len(s) > axis:
        return int(s[axis])
    return None

  layers = {int(m.group(1)) for n in shapes if (m := _BLOCK_RE.match(n))}
  found = {
      "vocab_size": dim(_EMBEDDING, 0),
      "d_model": dim(_EMBEDDING, 1) or dim("norm.weight", 0) or dim("norm1.weight", 0),
      "d_ff": dim("ffn.gate.0.weight", 0) or dim("ffn.fc1.weight", 0) or dim("ffn.fc2.weight", 1),
      "num_heads": dim("pos_embedding.embedding.weight", 1),
      "relative_attention_num_buckets": dim("pos_embedding.embedding.weight", 0),
      "num_layers": max(layers) + 1 if layers else None,
  }
  inner = dim("attn.q.weight", 0) or dim("attn.k.weight", 0) or dim("attn.o.weight", 1)
  stated = {k: cj.get(k) for k in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv",
                                   "num_layers", "relative_attention_num_buckets")}
  values = {k: v if v is not None else stated.get(k) for k, v in found.items()}
  if values["num_heads"] and inner:
    if inner % values["num_heads"]:
      raise ConversionError(f"the attention width {inner} is not divisible by the "
                            f"{values['num_heads']} heads of the position-bias tables.")
    values["d_kv"] = inner // values["num_heads"]
  else:
    values["d_kv"] = stated.get("d_kv")
  unknown = sorted(k for k, v in values.items() if v is None)
  if unknown:
    raise ConversionError(f"cannot infer {unknown} of the umT5 encoder: the checkpoint lacks the "
                          f"keys that carry them and no config.json says (keys seen: "
                          f"{list(shapes)[:8]}).")
  conflicts = [f"{k}: config.json says {stated[k]}, the tensors say {values[k]}"
               for k in stated if stated[k] is not None and int(stated[k]) != values[k]]
  if conflicts:
    raise ConversionError("config.json disagrees with the checkpoint's shapes:\n  " +
                          "\n  ".join(conflicts))
  arch = {k: int(v) for k, v in values.items()}
  arch["relative_attention_max_distance"] = int(cj.get("relative_attention_max_distance", 128))
  arch["eps"] = float(cj.get("layer_norm_epsilon", 1e-6))
  try:
    cfg = umt5.UMT5Config(**arch, param_dtype=dtype)
  except ValueError as e:
    raise ConversionError(f"the inferred architecture is not a valid umT5: {e}") from e
  info = {"inferred_from_shapes": sorted(k for k, v in found.items() if v is not None),
          "from_config_json": sorted(k for k in ("relative_attention_max_distance", "eps")
                                     if ("layer_norm_epsilon" if k == "eps" else k) in cj)}
  return cfg, info


# ----------------------------------------------------------------------------------------------
# Planning: which source tensor goes where. Reads names, shapes and dtypes only.


@dataclasses.dataclass
class Plan:
  cfg: umt5.UMT5Config
  keys: dict[str, KeySpec]  # original key -> placement, in checkpoint order
  source_names: dict[str, str]  # original key -> name in the checkpoint
  copies: dict[str, list[str]]  # original key -> further checkpoint names holding the same tensor
  naming: str
  dtype: str
  selection: common.Selection
  info: dict[str, Any]


def _source_dtype(reader, names) -> str:
  """'bfloat16' when every tensor is bfloat16 (Wan's release), else 'float32'."""
  kinds = {np.dtype(reader.dtype(n)) for n in names}
  return "bfloat16" if kinds == {np.dtype(ml_dtypes.bfloat16)} else "float32"


def make_plan(reader: sources.TensorReader, *, fmt: str = "auto", dtype: str = "auto",
              encoder_only: bool = False, config_json: Mapping | None = None,
              log: Log = common.log_stderr) -> Plan:
  """Maps every tensor of `reader` onto the umT5 param tree, or raises listing what does not fit."""
  if fmt not in FORMATS:
    raise ConversionError(f"--format must be one of {FORMATS}, got {fmt!r}.")
  if dtype != "auto" and dtype not in DTYPES:
    raise ConversionError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}.")
  selection = common.select_weights(reader.keys(), ROOTS, what="umT5 encoder", log=log)
  names = dict(selection.names)
  naming = fmt if fmt != "auto" else detect_naming(names)
  if naming is None:
    raise ConversionError("cannot tell whether the keys use Wan's names (token_embedding, "
                          "blocks.i...) or Hugging Face names (shared, encoder.block.i...) (first "
                          f"keys: {list(names)[:6]}); pass --format=original or --format=hf.")
  notes = []
  decoder = [n for n in names if n.split(".")[0] in ("decoder", "lm_head")]
  if naming == "hf" and encoder_only and decoder:
    for n in decoder:
      del names[n]
    notes.append(f"--encoder_only: left out {len(decoder)} decoder / lm_head tensors.")
  canonical: dict[str, str] = {}  # original key (or the cleaned name when unmappable) -> source
  copies: dict[str, list[str]] = collections.defaultdict(list)
  for name, src in names.items():
    orig = hf_to_original(name) if naming == "hf" else name
    orig = orig if orig is not None else name
    if orig in canonical:
      copies[orig].append(src)  # the tied embedding saved twice
    else:
      canonical[orig] = src
  shapes = {n: tuple(reader.shape(s)) for n, s in canonical.items()}
  chosen = dtype if dtype != "auto" else _source_dtype(reader, canonical.values())
  cfg, info = infer_config(shapes, config_json, chosen, log)
  expected = expected_keys(cfg)

  fmt_shape = common.fmt_shape
  missing = [f"{n} {fmt_shape(s.torch_shape)}" for n, s in expected.items() if n not in canonical]
  unexpected, misshaped, bad_dtype = [], [], []
  for n, src in canonical.items():
    shown = n if src == n else f"{n} (in the checkpoint: {src})"
    if n not in expected:
      unexpected.append(f"{src} {fmt_shape(shapes[n])}")
    elif shapes[n] != expected[n].torch_shape:
      misshaped.append(f"{shown} is {fmt_shape(shapes[n])}, expected "
                       f"{fmt_shape(expected[n].torch_shape)}")
    elif not common.is_float(reader.dtype(src)):
      bad_dtype.append(f"{shown} has dtype {reader.dtype(src)}, expected a float type")
    for c in copies.get(n, ()):
      if tuple(reader.shape(c)) != shapes[n]:
        misshaped.append(f"{c} is {fmt_shape(reader.shape(c))}, its tied copy {src} is "
                         f"{fmt_shape(shapes[n])}")
  if missing or unexpected or misshaped or bad_dtype:
    parts = [f"cannot map the checkpoint completely onto the umT5 encoder (inferred {naming} "
             f"names, vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, d_ff={cfg.d_ff}, "
             f"num_heads={cfg.num_heads}, d_kv={cfg.d_kv}, num_layers={cfg.num_layers}):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("misshaped", misshaped), ("wrong dtype", bad_dtype)):
      if items:
        parts.append(common.listing(title, items))
    if decoder and naming == "hf" and not encoder_only:
      parts.append("  The checkpoint holds a decoder (a full encoder-decoder UMT5 model); pass "
                   "--encoder_only to convert its encoder alone.")
    raise ConversionError("\n".join(parts))
  order = {src: i for i, src in enumerate(reader.keys())}
  ordered = sorted(expected, key=lambda n: order[canonical[n]])  # read the file front to back
  for note in notes:
    log(note)
  selection.notes.extend(notes)
  return Plan(cfg, {n: expected[n] for n in ordered}, {n: canonical[n] for n in ordered},
              {n: list(c) for n, c in copies.items() if n in expected}, naming, chosen, selection,
              info)


def _same(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
  """Equal values, compared a few thousand rows at a time (no full-size temporaries)."""
  if a.shape != b.shape:
    return False
  for i in range(0, a.shape[0] if a.ndim else 1, rows):
    x, y = (a[i:i + rows], b[i:i + rows]) if a.ndim else (a, b)
    if not np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)):
      return False
  return True


def _fill(reader: sources.TensorReader, plan: Plan, write: Callable, log: Log) -> None:
  """Reads every planned tensor once and writes it, in JAX layout, to its leaf (slot)."""
  total = sum(int(np.prod(s.torch_shape)) for s in plan.keys.values())
  bar = common.progress(total, "convert", log)
  for name, spec in plan.keys.items():
    arr = reader.read(plan.source_names[name])
    for copy in plan.copies.get(name, ()):
      if not _same(arr, reader.read(copy)):
        raise ConversionError(f"{plan.source_names[name]} and {copy} should hold the same tied "
                              f"embedding but differ; convert from a checkpoint with one of them.")
    write(spec.path, spec.layer, arr.T if spec.transpose else arr)
    del arr  # unmaps the source pages of this tensor
    bar(int(np.prod(spec.torch_shape)))
  bar(None)


def _leaf_specs(cfg: umt5.UMT5Config, dtype: np.dtype) -> dict[PathTuple, tuple]:
  return {p: (tuple(l.shape), dtype)
          for p, l in orbax_io.flatten(umt5.abstract_params(cfg)).items()}


# ----------------------------------------------------------------------------------------------
# Public API.


def state_dict_to_params(state: Mapping[str, Any], config_json: Mapping[str, Any] | None = None, *,
                         fmt: str = "auto", dtype: str = "auto", encoder_only: bool = False,
                         verbose: bool = False) -> tuple[umt5.UMT5Config, dict[str, Any]]:
  """In-memory conversion of a umT5 state dict (Wan or Hugging Face names).

  Args:
    state: name -> numpy array or torch tensor (nested dicts allowed).
    config_json: the Hugging Face config.json contents, if any.
    fmt, dtype, encoder_only: as for `convert`.

  Returns:
    (UMT5Config, params) with params a nested dict of numpy arrays shaped like
    `umt5.abstract_params(cfg)`.
  """
  log = common.log_stderr if verbose else common.quiet
  reader = common.MappingReader(state)
  plan = make_plan(reader, fmt=fmt, dtype=dtype, encoder_only=encoder_only,
                   config_json=config_json, log=log)
  params = orbax_io.fill_in_memory(_leaf_specs(plan.cfg, DTYPES[plan.dtype]),
                                   lambda write: _fill(reader, plan, write, log))
  return plan.cfg, params


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "auto",
            dtype: str = "auto", encoder_only: bool = False, overwrite: bool = False,
            verbose: bool = True) -> umt5.UMT5Config:
  """Converts a PyTorch umT5 encoder checkpoint into DIR/config.json + DIR/params (Orbax).

  Args:
    src: Wan's .pth, a safetensors file, a `*.safetensors.index.json`, or a Hugging Face model
      folder (config.json + model.safetensors or its shards).
    dst: output directory; must not exist or be empty unless `overwrite`.
    fmt: 'auto' | 'original' (Wan names) | 'hf' (Hugging Face names).
    dtype: stored param dtype: 'float32', 'bfloat16', or 'auto' (bfloat16 when every source
      tensor is, as in Wan's release; float32 otherwise).
    encoder_only: drop the decoder / lm_head tensors of a full encoder-decoder checkpoint.
    overwrite: replace a non-empty `dst`.
    verbose: notes and a progress bar on stderr.

  Returns:
    The UMT5Config written to config.json.
  Raises:
    ConversionError (a ValueError) listing missing / unexpected / misshaped keys, or naming the
    problem with the input; FileNotFoundError for a missing src. Nothing is left at `dst` or beside
    it on failure.
  """
  log = common.log_stderr if verbose else common.quiet
  if dtype != "auto" and dtype not in DTYPES:
    raise ConversionError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}.")
  dst = common.check_destination(dst, overwrite, src=src)
  try:
    source = sources.open_checkpoint(src, log)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  plan = make_plan(source.reader, fmt=fmt, dtype=dtype, encoder_only=encoder_only,
                   config_json=source.config, log=log)
  cfg = plan.cfg
  log(f"converting {len(plan.keys)} tensors ({plan.naming} names) into UMT5Config(d_model="
      f"{cfg.d_model}, heads={cfg.num_heads}, layers={cfg.num_layers}, vocab={cfg.vocab_size}) as "
      f"{plan.dtype} -> {dst}")
  specs = _leaf_specs(cfg, DTYPES[plan.dtype])
  common.check_space(dst, specs, "the umt5 conversion")
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
        "kind": KIND,
        "config": cfg.to_dict(),
        "source": {
            "path": str(Path(src).expanduser().absolute()),
            **source.describe(),
            "format": fmt,
            "naming": plan.naming,
            "key": plan.selection.key,
            "stripped_prefixes": plan.selection.stripped_prefixes,
            "num_tensors": len(plan.keys),
            "tied_copies": {n: c for n, c in plan.copies.items()},
            "source_dtypes": dict(source_dtypes),
            "dtype": plan.dtype,
            **plan.info,
            "notes": source.notes + plan.selection.notes,
        },
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
  log(f"wrote {dst}")
  return cfg


# ----------------------------------------------------------------------------------------------
# Loading a converted directory.


def read_converted(directory: str | os.PathLike) -> tuple[dict[str, Any], umt5.UMT5Config]:
  """(config.json contents, UMT5Config) of a directory written by `convert`."""
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist; is {directory} a directory written by "
                            f"`python -m asd_jax.convert umt5`?")
  meta = json.loads(path.read_text())
  if not isinstance(meta, dict) or meta.get("kind") != KIND or "config" not in meta:
    kind = meta.get("kind") if isinstance(meta, dict) else None
    raise ValueError(f"{path} describes a {kind!r} checkpoint, not a umT5 text encoder ('umt5').")
  return meta, umt5.UMT5Config.from_dict(meta["config"])


def load_converted(directory: str | os.PathLike, *, shardings: Any = None,
                   **overrides) -> tuple[umt5.UMT5Encoder, dict[str, Any]]:
  """(module, params) of a directory written by `convert`.

  Args:
    directory: config.json (kind "umt5") + params/.
    shardings: None (first local device), one `jax.sharding.Sharding` for every leaf, or a pytree
      of shardings shaped like the params; each leaf is read straight into its shards.
    **overrides: execution fields of UMT5Config (dtype, param_dtype, precision, scan_layers).
      `param_dtype` also casts the restored params; without it they keep the stored dtype.
  """
  directory = Path(directory)
  meta, cfg = read_converted(directory)
  changed = [k for k in umt5.UMT5Config.ARCH_FIELDS
             if k in overrides and overrides[k] != getattr(cfg, k)]
  if changed:
    raise ValueError(f"cannot override architecture fields {changed} at load time: the params were "
                     f"made for {[(k, getattr(cfg, k)) for k in changed]}.")
  cfg = umt5.UMT5Config.from_dict({**meta["config"], **overrides})
  params = orbax_io.restore_checked(directory / PARAMS_DIR, umt5.abstract_params(cfg),
                                    shardings=shardings, dtype=overrides.get("param_dtype"),
                                    what="the UMT5Config of its config.json")
  return umt5.UMT5Encoder(cfg), params


# ----------------------------------------------------------------------------------------------
# Command line: python -m asd_jax.convert umt5 ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True,
                      help="Wan's models_t5_umt5-xxl-enc-bf16.pth, a safetensors file or index, or "
                           "a Hugging Face UMT5EncoderModel folder (config.json + safetensors).")
  parser.add_argument("--dst", required=True, help="output directory (must be absent or empty).")
  parser.add_argument("--format", default="auto", choices=FORMATS,
                      help="key naming: original (Wan) or hf (Hugging Face). Default: detect.")
  parser.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                      help="stored param dtype (default: bfloat16 when the source is all "
                           "bfloat16, as Wan's release, else float32).")
  parser.add_argument("--encoder_only", action="store_true",
                      help="convert the encoder of a full encoder-decoder UMT5 checkpoint, "
                           "leaving out decoder.* and lm_head.*.")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst.")
  parser.add_argument("--quiet", action="store_true", help="no notes or progress bar.")


def run(args: argparse.Namespace) -> int:
  """Runs `convert umt5`; returns the exit code (errors go to stderr)."""
  try:
    convert(args.src, args.dst, fmt=args.format, dtype=args.dtype,
            encoder_only=args.encoder_only, overwrite=args.overwrite, verbose=not args.quiet)
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
