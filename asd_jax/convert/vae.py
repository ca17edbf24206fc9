"""Wan 2.1 VAE: PyTorch checkpoints -> Orbax param trees (`python -m asd_jax.convert vae`).

    cfg = convert(src, dst)                       # what the CLI runs
    cfg, params = state_dict_to_params(state)     # in memory, for tests and small models
    module, params = load_converted(dst)          # what asd_jax.pretrained.load calls for "vae"

Inputs: the original `Wan2.1_VAE.pth` (torch pickle, original names such as
`decoder.upsamples.3.time_conv.weight`) or a diffusers `AutoencoderKLWan` folder (config.json +
diffusion_pytorch_model.safetensors, names such as
`decoder.up_blocks.0.upsamplers.0.time_conv.weight`), or a pipeline folder (its `vae/` is used) or
a release folder holding `Wan2.1_VAE.pth`.

Conversion streams as for the DiT (asd_jax.convert.wan): names and shapes are read first, the
architecture is inferred from the shapes (config.json, when it is an AutoencoderKLWan config,
gives the latent mean/std and is checked against the shapes), every key is checked against
`vae.abstract_params(cfg)`, and only then is data read, one tensor at a time, into disk-backed
arrays that Orbax saves. Anything unmappable is refused with the lists of missing / unexpected /
misshaped keys and nothing is written.

Output directory layout:
  DIR/config.json  {"kind": "vae", "config": VAEConfig.to_dict(), "source": {...}}
  DIR/params/      Orbax PyTree checkpoint of the param tree

Layouts (torch -> JAX): Conv3d weight [O, I, kt, kh, kw] -> kernel [kt, kh, kw, I, O]; Conv2d
weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; gamma [C, 1, 1(, 1)] -> scale [C]; biases as
they are.
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

import numpy as np

from asd_jax.convert import common
from asd_jax.convert import wan as convert_wan
from asd_jax.convert.common import ConversionError
from asd_jax.io import orbax_io
from asd_jax.io import sources
from asd_jax.models import vae

HELP = ("Wan 2.1 VAE (Wan2.1_VAE.pth or a diffusers AutoencoderKLWan folder) -> DIR/config.json "
        "+ DIR/params (Orbax).")
KIND = "vae"
FORMATS = ("auto", "original", "diffusers")
DTYPES = convert_wan.DTYPES
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
ORIGINAL_FILE = "Wan2.1_VAE.pth"
ORIGINAL_ROOTS = frozenset({"encoder", "decoder", "conv1", "conv2"})
DIFFUSERS_ROOTS = frozenset({"encoder", "decoder", "quant_conv", "post_quant_conv"})
ROOTS = ORIGINAL_ROOTS | DIFFUSERS_ROOTS

Log = Callable[[str], None]
PathTuple = tuple[str, ...]

# ----------------------------------------------------------------------------------------------
# Names and layouts.

# JAX module name inside a block -> (diffusers name, original name).
_INNER = {
    "norm1": ("norm1", "residual.0"), "conv1": ("conv1", "residual.2"),
    "norm2": ("norm2", "residual.3"), "conv2": ("conv2", "residual.6"),
    "conv_shortcut": ("conv_shortcut", "shortcut"),
    "resample": ("resample.1", "resample.1"), "time_conv": ("time_conv", "time_conv"),
    "norm": ("norm", "norm"), "to_qkv": ("to_qkv", "to_qkv"), "proj": ("proj", "proj"),
}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "gamma"}


@dataclasses.dataclass(frozen=True)
class KeySpec:
  """Where one PyTorch tensor lives in the JAX tree."""
  path: PathTuple  # leaf path in the param tree
  layout: str  # conv3d | conv2d | gamma3 | gamma2 | same
  torch_shape: tuple[int, ...]
  diffusers: str  # the diffusers name of the same tensor


def _index(name: str) -> int:
  return int(name.rsplit("_", 1)[1])


def key_names(path: PathTuple, num_res_blocks: int) -> tuple[str, str]:
  """(original name, diffusers name) of the JAX leaf `path`."""
  *mods, leaf = path
  if leaf not in _LEAF:
    raise KeyError(f"param {'/'.join(path)} has no PyTorch name.")
  weight = _LEAF[leaf]
  if mods in (["quant_conv"], ["post_quant_conv"]):
    orig = {"quant_conv": "conv1", "post_quant_conv": "conv2"}[mods[0]]
    return f"{orig}.{weight}", f"{mods[0]}.{weight}"
  net, head, *rest = mods
  if head == "conv_in":
    d, o = ["conv_in"], ["conv1"]
  elif head == "norm_out":
    d, o = ["norm_out"], ["head.0"]
  elif head == "conv_out":
    d, o = ["conv_out"], ["head.2"]
  elif head == "mid_block":
    sub, *rest = rest
    kind = "resnets" if sub.startswith("resnets") else "attentions"
    d = ["mid_block", kind, str(_index(sub))]
    o = ["middle", str({"resnets_0": 0, "attentions_0": 1, "resnets_1": 2}[sub])]
  elif head.startswith("down_blocks_"):
    d, o = ["down_blocks", str(_index(head))], ["downsamples", str(_index(head))]
  elif head.startswith("up_blocks_"):
    i = _index(head)
    sub, *rest = rest
    offset = i * (num_res_blocks + 2)
    if sub == "upsampler":
      d = ["up_blocks", str(i), "upsamplers", "0"]
      o = ["upsamples", str(offset + num_res_blocks + 1)]
    else:
      j = _index(sub)
      d, o = ["up_blocks", str(i), "resnets", str(j)], ["upsamples", str(offset + j)]
  else:
    raise KeyError(f"param {'/'.join(path)} has no PyTorch name.")
  for m in rest:
    if m not in _INNER:
      raise KeyError(f"param {'/'.join(path)} has no PyTorch name.")
    d.append(_INNER[m][0])
    o.append(_INNER[m][1])
  return ".".join([net, *o, weight]), ".".join([net, *d, weight])


def _layout(path: PathTuple, shape: tuple[int, ...]) -> str:
  if path[-1] == "kernel":
    return {5: "conv3d", 4: "conv2d"}[len(shape)]
  if path[-1] == "scale":
    return "gamma2" if path[-2] == "norm" else "gamma3"  # the attention norm is [C, 1, 1]
  return "same"


def to_jax(x: np.ndarray, layout: str) -> np.ndarray:
  """Torch-layout tensor -> JAX-layout view."""
  if layout == "conv3d":
    return x.transpose(2, 3, 4, 1, 0)
  if layout == "conv2d":
    return x.transpose(2, 3, 1, 0)
  if layout.startswith("gamma"):
    return x.reshape(x.shape[0])
  return x


def torch_shape(jax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "conv3d":
    return tuple(jax_shape[i] for i in (4, 3, 0, 1, 2))
  if layout == "conv2d":
    return tuple(jax_shape[i] for i in (3, 2, 0, 1))
  if layout == "gamma3":
    return (jax_shape[0], 1, 1, 1)
  if layout == "gamma2":
    return (jax_shape[0], 1, 1)
  return tuple(jax_shape)


def expected_keys(cfg: vae.VAEConfig) -> dict[str, KeySpec]:
  """Every original key of a VAE with config `cfg`, with its placement (from abstract_params)."""
  out = {}
  for path, leaf in orbax_io.flatten(vae.abstract_params(cfg)).items():
    orig, diff = key_names(path, cfg.num_res_blocks)
    layout = _layout(path, tuple(leaf.shape))
    out[orig] = KeySpec(path, layout, torch_shape(tuple(leaf.shape), layout), diff)
  return out


def detect_naming(names) -> str | None:
  names = list(names)
  orig = any(re.match(r"(encoder\.downsamples|decoder\.upsamples|(en|de)coder\.head|conv[12]\.)", n)
             for n in names)
  diff = any(re.match(r"(encoder\.down_blocks|decoder\.up_blocks|(en|de)coder\.(mid_block|"
                      r"conv_in)|(post_)?quant_conv\.)", n) for n in names)
  if orig == diff:
    return None
  return "original" if orig else "diffusers"


# ----------------------------------------------------------------------------------------------
# Architecture from shapes.


# config.json fields of AutoencoderKLWan that select something other than the Wan 2.1 VAE, with the
# test a Wan 2.1 value passes.
_WAN21_ONLY = {
    "attn_scales": lambda v, c: not v,
    "is_residual": lambda v, c: not v,  # Wan 2.2
    "patch_size": lambda v, c: v is None,
    "in_channels": lambda v, c: v == 3,
    "out_channels": lambda v, c: v == 3,
    "decoder_base_dim": lambda v, c: v in (None, c.get("base_dim")),
}


def _vae_config_json(config_json: Mapping | None, log: Log) -> dict | None:
  """The config.json contents when it describes an AutoencoderKLWan, else None (with a note)."""
  if not config_json:
    return None
  c = dict(config_json)
  if c.get("_class_name") != "AutoencoderKLWan" and not {"base_dim", "z_dim"} <= set(c):
    log("ignoring config.json next to the weights: it is not an AutoencoderKLWan config.")
    return None
  bad = {k: c[k] for k, ok in _WAN21_ONLY.items() if k in c and not ok(c[k], c)}
  if bad:
    raise ConversionError(f"config.json describes a VAE this port does not implement (it covers "
                          f"the Wan 2.1 VAE only): {bad}.")
  return c


def infer_config(shapes: Mapping[str, tuple[int, ...]], naming: str,
                 config_json: Mapping | None, dtype: str,
                 log: Log) -> tuple[vae.VAEConfig, dict[str, Any]]:
  """VAEConfig from the shapes of the encoder (names in `naming`); what cannot be read from the
  shapes falls back to config.json or the 'wan2.1' preset, and the key check then lists it."""
  base = vae.VAEConfig.preset("wan2.1")
  cj = _vae_config_json(config_json, log)
  fields: dict[str, Any] = {}
  if cj:
    for ours, theirs in (("base_dim", "base_dim"), ("z_dim", "z_dim"), ("dim_mult", "dim_mult"),
                         ("num_res_blocks", "num_res_blocks"),
                         ("temporal_downsample", "temperal_downsample")):
      if theirs in cj:
        fields[ours] = cj[theirs]
  blocks = "downsamples" if naming == "original" else "down_blocks"
  conv_in = "conv1" if naming == "original" else "conv_in"
  post = "conv2.weight" if naming == "original" else "post_quant_conv.weight"
  first_conv = "residual.2.weight" if naming == "original" else "conv1.weight"
  inferred: dict[str, Any] = {}
  if len(shapes.get(f"encoder.{conv_in}.weight", ())) == 5:
    inferred["base_dim"] = int(shapes[f"encoder.{conv_in}.weight"][0])
  if len(shapes.get(post, ())) == 5:
    inferred["z_dim"] = int(shapes[post][0])
  entries = sorted({int(m.group(1)) for n in shapes
                    if (m := re.match(rf"encoder\.{blocks}\.(\d+)\.", n))})
  resamples = [n for n in entries if f"encoder.{blocks}.{n}.resample.1.weight" in shapes]
  if entries:
    R = resamples[0] if resamples else len(entries)
    inferred["num_res_blocks"] = R
    inferred["temporal_downsample"] = tuple(f"encoder.{blocks}.{n}.time_conv.weight" in shapes
                                            for n in resamples)
    b = inferred.get("base_dim", fields.get("base_dim", base.base_dim))
    mult = []
    for i in range(len(resamples) + 1):
      s = shapes.get(f"encoder.{blocks}.{i * (R + 1)}.{first_conv}")
      if s is None or len(s) != 5 or s[0] % b:
        mult = None
        break
      mult.append(int(s[0]) // b)
    if mult:
      inferred["dim_mult"] = tuple(mult)
  for k, v in inferred.items():
    if k in fields and tuple(np.atleast_1d(fields[k]).tolist()) != tuple(
        np.atleast_1d(v).tolist()):
      raise ConversionError(f"config.json says {k}={fields[k]}, the checkpoint's shapes say {v}.")
  fields.update(inferred)
  z = fields.get("z_dim", base.z_dim)
  stats = [cj.get("latents_mean"), cj.get("latents_std")] if cj else [None, None]
  if all(s is not None for s in stats) and any(len(s) != z for s in stats):
    log(f"config.json's latents_mean/latents_std have {len(stats[0])}/{len(stats[1])} values for "
        f"z_dim={z}; ignoring them.")
    stats = [None, None]
  if all(s is not None for s in stats):
    stats_from = "config.json"
    fields["latents_mean"], fields["latents_std"] = stats
  elif z == len(vae.WAN21_LATENTS_MEAN):
    stats_from = "wan2.1"
  else:
    stats_from = "identity"
    fields["latents_mean"], fields["latents_std"] = (0.0,) * z, (1.0,) * z
    log(f"z_dim={z} and no config.json gives the latent mean/std: using mean 0, std 1.")
  try:
    cfg = base.replace(**fields, param_dtype=dtype)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"the checkpoint does not describe a valid Wan VAE ({e}); inferred "
                          f"{fields}.") from e
  return cfg, {"latents_stats_from": stats_from}


# ----------------------------------------------------------------------------------------------
# Planning: which source tensor goes where. Reads names, shapes and dtypes only.


@dataclasses.dataclass
class Plan:
  cfg: vae.VAEConfig
  keys: dict[str, KeySpec]  # original key -> placement, in checkpoint order
  source_names: dict[str, str]  # original key -> name in the checkpoint
  naming: str
  selection: common.Selection
  info: dict[str, Any]


def _fmt(shape) -> str:
  return "[" + ", ".join(str(s) for s in shape) + "]"


def make_plan(reader: sources.TensorReader, *, fmt: str = "auto", key: str | None = None,
              config_json: Mapping | None = None, dtype: str = "float32",
              log: Log = common.log_stderr) -> Plan:
  """Maps every tensor of `reader` onto the VAE param tree, or raises listing what does not fit."""
  if fmt not in FORMATS:
    raise ConversionError(f"--format must be one of {FORMATS}, got {fmt!r}.")
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  selection = common.select_weights(reader.keys(), ROOTS, key=key, what="Wan VAE", log=log)
  naming = fmt if fmt != "auto" else detect_naming(selection.names)
  if naming is None:
    raise ConversionError("cannot tell whether the keys use original Wan VAE names or diffusers "
                          f"names (first keys: {list(selection.names)[:6]}); pass "
                          "--format=original or --format=diffusers.")
  shapes = {n: tuple(reader.shape(s)) for n, s in selection.names.items()}
  cfg, info = infer_config(shapes, naming, config_json, dtype, log)
  expected = expected_keys(cfg)
  by_name = expected if naming == "original" else {s.diffusers: s for s in expected.values()}
  original_of = {s.diffusers: o for o, s in expected.items()}
  missing = [f"{n} {_fmt(s.torch_shape)}" for n, s in by_name.items() if n not in shapes]
  unexpected, misshaped, bad_dtype = [], [], []
  for n, src in selection.names.items():
    shown = n if src == n else f"{n} (in the checkpoint: {src})"
    if n not in by_name:
      unexpected.append(f"{shown} {_fmt(shapes[n])}")
    elif shapes[n] != by_name[n].torch_shape:
      misshaped.append(f"{shown} is {_fmt(shapes[n])}, expected {_fmt(by_name[n].torch_shape)}")
    elif not common.is_float(reader.dtype(src)):
      bad_dtype.append(f"{shown} has dtype {reader.dtype(src)}, expected a float type")
  if missing or unexpected or misshaped or bad_dtype:
    parts = [f"cannot map the checkpoint completely onto the Wan VAE (inferred {naming} names, "
             f"base_dim={cfg.base_dim}, z_dim={cfg.z_dim}, dim_mult={list(cfg.dim_mult)}, "
             f"num_res_blocks={cfg.num_res_blocks}, "
             f"temporal_downsample={list(cfg.temporal_downsample)}):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("misshaped", misshaped), ("wrong dtype", bad_dtype)):
      if items:
        parts.append(common.listing(title, items))
    raise ConversionError("\n".join(parts))
  order = {src: i for i, src in enumerate(reader.keys())}
  names = sorted(by_name, key=lambda n: order[selection.names[n]])  # read the file front to back
  to_orig = (lambda n: n) if naming == "original" else original_of.get
  return Plan(cfg, {to_orig(n): by_name[n] for n in names},
              {to_orig(n): selection.names[n] for n in names}, naming, selection, info)


def _fill(reader: sources.TensorReader, plan: Plan, write: Callable, log: Log) -> None:
  bar = common.progress(
      sum(int(np.prod(s.torch_shape)) for s in plan.keys.values()), "convert", log)
  for name, spec in plan.keys.items():
    arr = reader.read(plan.source_names[name])
    write(spec.path, None, to_jax(arr, spec.layout))
    del arr
    bar(int(np.prod(spec.torch_shape)))
  bar(None)


def _leaf_specs(cfg: vae.VAEConfig, dtype: np.dtype) -> dict[PathTuple, tuple]:
  leaves = orbax_io.flatten(vae.abstract_params(cfg))
  return {p: (tuple(l.shape), dtype) for p, l in leaves.items()}


# ----------------------------------------------------------------------------------------------
# Public API.


def state_dict_to_params(state: Mapping[str, Any], config_json: Mapping[str, Any] | None = None,
                         *, fmt: str = "auto", key: str | None = None, dtype: str = "float32",
                         verbose: bool = False) -> tuple[vae.VAEConfig, dict[str, Any]]:
  """In-memory conversion of a VAE state dict (original or diffusers names; numpy or torch).

  Returns (VAEConfig, params) with params nested dicts of numpy arrays shaped like
  `vae.abstract_params(cfg)`.
  """
  log = common.log_stderr if verbose else common.quiet
  reader = common.MappingReader(state)
  plan = make_plan(reader, fmt=fmt, key=key, config_json=config_json, dtype=dtype, log=log)
  params = orbax_io.fill_in_memory(_leaf_specs(plan.cfg, DTYPES[dtype]),
                                   lambda write: _fill(reader, plan, write, log))
  return plan.cfg, params


def _open(src: str | os.PathLike, log: Log) -> sources.Source:
  """Opens --src; folders: a pipeline's vae/, a release folder's Wan2.1_VAE.pth, else as usual."""
  path = Path(src).expanduser()
  if path.is_dir():
    if (path / "model_index.json").is_file() and (path / "vae").is_dir():
      log(f"{path} is a diffusers pipeline; converting its vae/ folder.")
      path = path / "vae"
    elif (path / ORIGINAL_FILE).is_file():
      path = path / ORIGINAL_FILE
  try:
    return sources.open_checkpoint(path, log)
  except ValueError as e:  # not a checkpoint, ambiguous folder, ...: say what, without a traceback
    raise ConversionError(str(e)) from e


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "auto",
            key: str | None = None, dtype: str = "float32", overwrite: bool = False,
            verbose: bool = True) -> vae.VAEConfig:
  """Converts a PyTorch Wan VAE checkpoint into DIR/config.json + DIR/params (Orbax).

  Args:
    src: Wan2.1_VAE.pth (or any torch pickle / safetensors file with these keys), a diffusers
      AutoencoderKLWan folder, a diffusers pipeline folder (its vae/), or a folder holding
      Wan2.1_VAE.pth.
    dst: output directory; must not exist or be empty unless `overwrite`.
    fmt: 'auto' | 'original' | 'diffusers' key naming.
    key: sub-dict of the checkpoint holding the weights (default: the plain state dict).
    dtype: stored param dtype ('float32' or 'bfloat16'); recorded as `param_dtype`.
    overwrite: replace a non-empty `dst`.
    verbose: notes and a progress bar on stderr.

  Returns:
    The VAEConfig written to config.json.
  Raises:
    ConversionError (a ValueError) listing missing / unexpected / misshaped keys or naming the
    problem; FileNotFoundError for a missing src. Nothing is left at `dst` on failure.
  """
  log = common.log_stderr if verbose else common.quiet
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  dst = common.check_destination(dst, overwrite, src=src)
  source = _open(src, log)
  plan = make_plan(source.reader, fmt=fmt, key=key, config_json=source.config, dtype=dtype,
                   log=log)
  log(f"converting {len(plan.keys)} tensors ({plan.naming} names) into VAEConfig("
      f"base_dim={plan.cfg.base_dim}, z_dim={plan.cfg.z_dim}) as {dtype} -> {dst}")
  specs = _leaf_specs(plan.cfg, DTYPES[dtype])
  common.check_space(dst, specs, "the vae conversion")
  with common.atomic_directory(dst) as tmp:
    staging = orbax_io.MemmapStaging(tmp / ".staging", specs)
    _fill(source.reader, plan, staging.write, log)
    orbax_io.save_tree(tmp / PARAMS_DIR, staging.arrays())
    shutil.rmtree(tmp / ".staging")
    source_dtypes = collections.Counter(str(source.reader.dtype(s))
                                        for s in plan.source_names.values())
    meta = {
        "kind": KIND,
        "config": plan.cfg.to_dict(),
        "source": {
            "path": str(Path(src).expanduser().absolute()),
            **source.describe(),
            "format": fmt,
            "naming": plan.naming,
            "key": plan.selection.key,
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


def load_converted(directory: str | os.PathLike, *, shardings: Any = None,
                   **overrides) -> tuple[vae.WanVAE, dict[str, Any]]:
  """(WanVAE module, params) of a directory written by `convert`.

  Args:
    directory: with config.json (kind "vae") and params/.
    shardings: None (first local device), one `jax.sharding.Sharding` for every leaf, or a pytree
      of shardings shaped like the params.
    **overrides: execution fields of VAEConfig (dtype, param_dtype, precision); `param_dtype`
      also casts the restored params. Architecture and latent statistics cannot change.
  """
  directory = Path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist; is {directory} a directory written by "
                            f"`python -m asd_jax.convert vae`?")
  meta = json.loads(path.read_text())
  if not isinstance(meta, dict) or meta.get("kind") != KIND:
    raise ValueError(f"{path} does not describe a converted VAE (kind {meta.get('kind')!r}).")
  stored_cfg = vae.VAEConfig.from_dict(meta["config"])
  fixed = vae.VAEConfig.ARCH_FIELDS + vae.VAEConfig.STAT_FIELDS
  changed = [k for k in fixed if k in overrides and
             np.asarray(overrides[k]).tolist() != np.asarray(getattr(stored_cfg, k)).tolist()]
  if changed:
    raise ValueError(f"cannot override {changed} at load time: the params were made for "
                     f"{[(k, getattr(stored_cfg, k)) for k in changed]}. Override execution "
                     f"fields only (dtype, param_dtype, precision).")
  cfg = vae.VAEConfig.from_dict({**meta["config"], **overrides})
  params = orbax_io.restore_checked(
      directory / PARAMS_DIR, vae.abstract_params(cfg), shardings=shardings,
      dtype=cfg.param_dtype if "param_dtype" in overrides else None,
      what="the VAEConfig of config.json")
  return vae.WanVAE(cfg), params


# ----------------------------------------------------------------------------------------------
# Command line (dispatched by `python -m asd_jax.convert vae`).


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--src", required=True,
                 help="Wan2.1_VAE.pth, a diffusers AutoencoderKLWan folder (config.json + "
                      "diffusion_pytorch_model.safetensors), a pipeline folder, or a folder "
                      "holding Wan2.1_VAE.pth.")
  p.add_argument("--dst", required=True, help="output directory (must be absent or empty).")
  p.add_argument("--format", default="auto", choices=FORMATS,
                 help="key naming (original/diffusers). Default: detect.")
  p.add_argument("--key", default=None, help="sub-dict of the checkpoint holding the weights.")
  p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="stored param dtype.")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst.")
  p.add_argument("--quiet", action="store_true", help="no notes or progress bar.")


def run(args: argparse.Namespace) -> int:
  try:
    convert(args.src, args.dst, fmt=args.format, key=args.key, dtype=args.dtype,
            overwrite=args.overwrite, verbose=not args.quiet)
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
