"""Names and layouts of the Wan 2.1 DiT: original PyTorch keys <-> the JAX param tree, and diffusers
keys -> original keys. Shapes only; no tensor data is touched here.

The JAX tree is `asd_jax.models.wan.abstract_params(cfg)` (the single source of truth for shapes).
Every leaf under `blocks` has a leading layer axis; block i of the original is index i.

Layouts (torch -> JAX):
  linear   torch Linear weight [out, in]          -> kernel [in, out]            (transpose)
  conv3d   Conv3d weight [dim, C, pt, ph, pw]      -> kernel [pt, ph, pw, C, dim] (transpose 2,3,4,1,0)
  squeeze0 modulation [1, n, dim]                  -> [n, dim]
  same     biases, norm weights                    -> unchanged
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

from asd_jax.io.orbax_io import flatten
from asd_jax.models import wan

PathTuple = tuple[str, ...]

ORIGINAL_ROOTS = frozenset({"patch_embedding", "text_embedding", "time_embedding",
                            "time_projection", "blocks", "head"})
DIFFUSERS_ROOTS = frozenset({"patch_embedding", "condition_embedder", "blocks", "proj_out",
                             "scale_shift_table", "norm_out", "rope"})
ROOTS = ORIGINAL_ROOTS | DIFFUSERS_ROOTS

# JAX leaf path -> (original key, layout), outside the blocks.
_TOP: dict[PathTuple, tuple[str, str]] = {
    ("patch_embedding", "kernel"): ("patch_embedding.weight", "conv3d"),
    ("patch_embedding", "bias"): ("patch_embedding.bias", "same"),
    ("text_embedding", "fc1", "kernel"): ("text_embedding.0.weight", "linear"),
    ("text_embedding", "fc1", "bias"): ("text_embedding.0.bias", "same"),
    ("text_embedding", "fc2", "kernel"): ("text_embedding.2.weight", "linear"),
    ("text_embedding", "fc2", "bias"): ("text_embedding.2.bias", "same"),
    ("time_embedding", "fc1", "kernel"): ("time_embedding.0.weight", "linear"),
    ("time_embedding", "fc1", "bias"): ("time_embedding.0.bias", "same"),
    ("time_embedding", "fc2", "kernel"): ("time_embedding.2.weight", "linear"),
    ("time_embedding", "fc2", "bias"): ("time_embedding.2.bias", "same"),
    ("time_projection", "kernel"): ("time_projection.1.weight", "linear"),
    ("time_projection", "bias"): ("time_projection.1.bias", "same"),
    ("head", "modulation"): ("head.modulation", "squeeze0"),
    ("head", "head", "kernel"): ("head.head.weight", "linear"),
    ("head", "head", "bias"): ("head.head.bias", "same"),
}

# Leaf path below `blocks` (without the layer axis) -> (key below `blocks.i.`, layout).
_BLOCK: dict[PathTuple, tuple[str, str]] = {
    ("modulation",): ("modulation", "squeeze0"),
    ("norm3", "scale"): ("norm3.weight", "same"),
    ("norm3", "bias"): ("norm3.bias", "same"),
    ("ffn", "fc1", "kernel"): ("ffn.0.weight", "linear"),
    ("ffn", "fc1", "bias"): ("ffn.0.bias", "same"),
    ("ffn", "fc2", "kernel"): ("ffn.2.weight", "linear"),
    ("ffn", "fc2", "bias"): ("ffn.2.bias", "same"),
}
for _attn in ("self_attn", "cross_attn"):
  for _p in "qkvo":
    _BLOCK[(_attn, _p, "kernel")] = (f"{_attn}.{_p}.weight", "linear")
    _BLOCK[(_attn, _p, "bias")] = (f"{_attn}.{_p}.bias", "same")
  for _n in ("norm_q", "norm_k"):
    _BLOCK[(_attn, _n, "scale")] = (f"{_attn}.{_n}.weight", "same")


# ----------------------------------------------------------------------------------------------
# Layouts.


def to_jax(x: np.ndarray, layout: str) -> np.ndarray:
  """Torch-layout tensor -> JAX-layout view (no copy)."""
  if layout == "linear":
    return x.T
  if layout == "conv3d":
    return x.transpose(2, 3, 4, 1, 0)
  if layout == "squeeze0":
    return x.reshape(x.shape[1:])
  return x


def to_torch(x: np.ndarray, layout: str) -> np.ndarray:
  """JAX-layout tensor -> torch-layout view (the inverse of `to_jax`)."""
  if layout == "linear":
    return x.T
  if layout == "conv3d":
    return x.transpose(4, 3, 0, 1, 2)
  if layout == "squeeze0":
    return x.reshape((1,) + x.shape)
  return x


def torch_shape(jax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  return to_torch(np.empty(jax_shape, np.bool_), layout).shape if jax_shape else ()


# ----------------------------------------------------------------------------------------------
# Original key <-> JAX leaf.


@dataclasses.dataclass(frozen=True)
class KeySpec:
  """Where one original tensor lives in the JAX tree."""
  path: PathTuple  # leaf path in the param tree
  layer: int | None  # index along the layer axis for block leaves
  layout: str  # see `to_jax`
  torch_shape: tuple[int, ...]  # shape the original tensor must have


def expected_keys(cfg: wan.WanConfig, abstract: Mapping | None = None) -> dict[str, KeySpec]:
  """Every original key of a model with config `cfg`, in checkpoint order, with its placement.

  Shapes come from `wan.abstract_params(cfg)` (or `abstract`), so this stays right when the model
  changes; a leaf this table does not know raises (the table needs the new name).
  """
  leaves = flatten(abstract if abstract is not None else wan.abstract_params(cfg))
  top, blocks = {}, {}
  for path, leaf in leaves.items():
    shape = tuple(leaf.shape)
    if path[0] == "blocks":
      if path[1:] not in _BLOCK:
        raise KeyError(f"param blocks/{'/'.join(path[1:])} has no original Wan name in "
                       f"asd_jax.convert.wan_keys; add it to _BLOCK.")
      suffix, layout = _BLOCK[path[1:]]
      if shape[0] != cfg.num_layers:
        raise ValueError(f"blocks leaf {path} has leading axis {shape[0]}, expected "
                         f"{cfg.num_layers} layers.")
      blocks[path] = (suffix, layout, torch_shape(shape[1:], layout))
    else:
      if path not in _TOP:
        raise KeyError(f"param {'/'.join(path)} has no original Wan name in "
                       f"asd_jax.convert.wan_keys; add it to _TOP.")
      name, layout = _TOP[path]
      top[name] = KeySpec(path, None, layout, torch_shape(shape, layout))
  order = [v[0] for v in _TOP.values()]
  out = {n: top[n] for n in order if n in top and not n.startswith("head.")}
  block_order = [v[0] for v in _BLOCK.values()]
  by_suffix = {suffix: (path, layout, tshape) for path, (suffix, layout, tshape) in blocks.items()}
  for i in range(cfg.num_layers):
    for suffix in sorted(by_suffix, key=block_order.index):
      path, layout, tshape = by_suffix[suffix]
      out[f"blocks.{i}.{suffix}"] = KeySpec(path, i, layout, tshape)
  out.update({n: top[n] for n in order if n in top and n.startswith("head.")})
  return out


# ----------------------------------------------------------------------------------------------
# diffusers <-> original names (WAN.md section 3; no tensor changes layout in this mapping).

_DIFFUSERS_TO_ORIGINAL = [
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"scale_shift_table$", "head.modulation"),
    (r"proj_out\.", "head.head."),
    (r"blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers swapped norm2/norm3
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]
_DIFFUSERS_TO_ORIGINAL = [(re.compile("^" + p), r) for p, r in _DIFFUSERS_TO_ORIGINAL]

_ORIGINAL_TO_DIFFUSERS = [
    (r"text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"time_projection\.1\.", "condition_embedder.time_proj."),
    (r"head\.modulation$", "scale_shift_table"),
    (r"head\.head\.", "proj_out."),
    (r"blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
    (r"blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
    (r"blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
    (r"blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
    (r"blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
]
_ORIGINAL_TO_DIFFUSERS = [(re.compile("^" + p), r) for p, r in _ORIGINAL_TO_DIFFUSERS]


def _rename(name: str, table) -> str | None:
  for pattern, repl in table:
    new, n = pattern.subn(repl, name, count=1)
    if n:
      return new
  return None


def diffusers_to_original(name: str) -> str | None:
  """A diffusers WanTransformer3DModel key -> the original Wan key (None if it has none)."""
  if name.startswith("patch_embedding."):
    return name
  return _rename(name, _DIFFUSERS_TO_ORIGINAL)


def original_to_diffusers(name: str) -> str | None:
  """An original Wan key -> the diffusers WanTransformer3DModel key (None if it has none)."""
  if name.startswith("patch_embedding."):
    return name
  return _rename(name, _ORIGINAL_TO_DIFFUSERS)


_DIFFUSERS_MARKERS = re.compile(r"^(condition_embedder\.|proj_out\.|scale_shift_table$)|"
                                r"\.(attn1|attn2|scale_shift_table|ffn\.net)\b")
_ORIGINAL_MARKERS = re.compile(r"^(text_embedding\.|time_embedding\.|time_projection\.|head\.)|"
                               r"\.(self_attn|cross_attn|modulation)\b")


def detect_naming(names) -> str | None:
  """'original' or 'diffusers' from the key names; None when neither or both show up."""
  diffusers = any(_DIFFUSERS_MARKERS.search(n) for n in names)
  original = any(_ORIGINAL_MARKERS.search(n) for n in names)
  if diffusers == original:
    return None
  return "diffusers" if diffusers else "original"
