"""Wan 2.1 DiT architecture from checkpoint shapes (plus a config.json for what shapes cannot say)."""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Callable, Mapping

from asd_jax.convert import common
from asd_jax.convert.common import ConversionError
from asd_jax.models import wan

WAN_HEAD_DIM = 128  # every released Wan 2.1 DiT; used when nothing says how many heads

Log = Callable[[str], None]


def _most_common(values):
  values = [v for v in values if v is not None]
  return collections.Counter(values).most_common(1)[0][0] if values else None


def _dim(shape, axis):
  """shape[axis], or None when the key is absent or has too few axes."""
  if shape is None:
    return None
  try:
    return int(shape[axis])
  except IndexError:
    return None


def _config_json_fields(config_json: Mapping[str, Any] | None) -> tuple[dict, str | None]:
  """The architecture fields a config.json states, as WanConfig names, and its flavour."""
  if not config_json:
    return {}, None
  c = dict(config_json)
  out = {}
  if "num_attention_heads" in c:  # diffusers WanTransformer3DModel
    flavour = "diffusers"
    out["num_heads"] = int(c["num_attention_heads"])
    if "attention_head_dim" in c:
      out["dim"] = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    renames = {"in_channels": "in_channels", "out_channels": "out_channels", "text_dim": "text_dim",
               "freq_dim": "freq_dim", "ffn_dim": "ffn_dim", "num_layers": "num_layers",
               "patch_size": "patch_size", "eps": "eps", "cross_attn_norm": "cross_attn_norm",
               "rope_max_seq_len": "rope_max_len"}
  elif "num_heads" in c:  # original Wan (WanModel config.json of the release)
    flavour = "original"
    renames = {"dim": "dim", "num_heads": "num_heads", "ffn_dim": "ffn_dim", "freq_dim": "freq_dim",
               "text_dim": "text_dim", "in_dim": "in_channels", "out_dim": "out_channels",
               "num_layers": "num_layers", "patch_size": "patch_size", "eps": "eps",
               "text_len": "text_len", "qk_norm": "qk_norm", "cross_attn_norm": "cross_attn_norm"}
  else:
    return {}, None
  for src, dst in renames.items():
    if c.get(src) is not None:
      v = c[src]
      out[dst] = tuple(int(x) for x in v) if dst == "patch_size" else v
  return out, flavour


def infer_config(shapes: Mapping[str, tuple[int, ...]],
                 config_json: Mapping[str, Any] | None = None,
                 num_heads: int | None = None,
                 param_dtype: str = "float32",
                 log: Log = common.log_stderr) -> tuple[wan.WanConfig, dict[str, Any]]:
  """WanConfig from original-name shapes (plus a config.json and --num_heads for the heads).

  Fields come from: dim, in_channels, patch from patch_embedding.weight; ffn_dim from ffn.0; layers
  by counting blocks; text_dim / freq_dim from the first text / time Linear; out_channels = head rows
  / prod(patch); qk_norm / cross_attn_norm from whether the norm keys exist. Fields a key is missing
  for get a default: the completeness check that follows reports that key, so a default never
  reaches an output. num_heads: config.json, else `num_heads`, else dim // 128 (with a note).

  Returns:
    (config, info) where info says where num_heads and the config.json fields came from.
  Raises:
    ConversionError: no blocks, heads that do not divide dim, or a config.json that contradicts
      the weights.
  """
  layers = {int(m.group(1)) for n in shapes if (m := re.match(r"blocks\.(\d+)\.", n))}
  if not layers:
    raise ConversionError(f"no transformer blocks (keys blocks.N.*) found; this does not look like "
                          f"a Wan DiT. First keys: {sorted(shapes)[:8]}.")
  blocks = lambda suffix: [s for n, s in shapes.items() if re.fullmatch(rf"blocks\.\d+\.{suffix}", n)]
  pe = shapes.get("patch_embedding.weight")
  pe = pe if pe is not None and len(pe) == 5 else None
  dim = _most_common([_dim(pe, 0), _dim(shapes.get("patch_embedding.bias"), 0),
                      _dim(shapes.get("head.modulation"), -1)] +
                     [_dim(s, -1) for s in blocks(r"modulation")])
  if dim is None:
    raise ConversionError("cannot infer the model width: patch_embedding.weight/.bias, "
                          "head.modulation and blocks.N.modulation are all missing.")
  patch = tuple(pe[2:]) if pe else (1, 2, 2)
  in_channels = pe[1] if pe else 16
  ffn_dim = _most_common([_dim(s, 0) for s in blocks(r"ffn\.0\.weight")] +
                         [_dim(s, 0) for s in blocks(r"ffn\.0\.bias")]) or 4 * dim
  text_dim = _dim(shapes.get("text_embedding.0.weight"), 1) or 4096
  freq_dim = _dim(shapes.get("time_embedding.0.weight"), 1) or 256
  head_rows = _dim(shapes.get("head.head.weight"), 0)
  out_channels = in_channels
  if head_rows and head_rows % math.prod(patch) == 0:
    out_channels = head_rows // math.prod(patch)
  qk_norm = any(re.fullmatch(r"blocks\.\d+\.(self|cross)_attn\.norm_[qk]\.weight", n)
                for n in shapes)
  cross_attn_norm = any(re.fullmatch(r"blocks\.\d+\.norm3\.(weight|bias)", n) for n in shapes)
  inferred = dict(dim=dim, ffn_dim=ffn_dim, num_layers=max(layers) + 1, freq_dim=freq_dim,
                  text_dim=text_dim, patch_size=patch, in_channels=in_channels,
                  out_channels=out_channels, qk_norm=qk_norm, cross_attn_norm=cross_attn_norm)

  stated, flavour = _config_json_fields(config_json)
  conflicts = [f"{k}: config.json says {stated[k]}, the weights give {v}"
               for k, v in inferred.items() if k in stated and k != "num_heads" and stated[k] != v]
  if conflicts:
    raise ConversionError("config.json next to the weights contradicts them (is it for another "
                          "model?): " + "; ".join(conflicts) + ".")
  info: dict[str, Any] = {"config_json_flavour": flavour}
  if num_heads is not None and "num_heads" in stated and int(num_heads) != stated["num_heads"]:
    raise ConversionError(f"--num_heads={num_heads} contradicts config.json "
                          f"(num_heads {stated['num_heads']}).")
  if "num_heads" in stated:
    heads, info["num_heads_from"] = stated["num_heads"], "config.json"
  elif num_heads is not None:
    heads, info["num_heads_from"] = int(num_heads), "--num_heads"
  else:
    if dim % WAN_HEAD_DIM:
      raise ConversionError(f"num_heads cannot be inferred from shapes, there is no config.json, "
                            f"and dim {dim} is not a multiple of Wan's head_dim {WAN_HEAD_DIM}; "
                            f"pass --num_heads.")
    heads, info["num_heads_from"] = dim // WAN_HEAD_DIM, f"dim // {WAN_HEAD_DIM}"
    log(f"note: num_heads is not in the checkpoint; using dim // {WAN_HEAD_DIM} = {heads} "
        f"(Wan's head_dim). Pass --num_heads to override.")
  if heads <= 0 or dim % heads:
    raise ConversionError(f"num_heads {heads} does not divide dim {dim}.")
  fields = dict(inferred, num_heads=heads, param_dtype=param_dtype)
  for k in ("eps", "text_len", "rope_max_len"):
    if k in stated:
      fields[k] = stated[k]
  try:
    return wan.WanConfig(**fields), info
  except ValueError as e:
    raise ConversionError(f"the inferred architecture is not a valid WanConfig: {e}") from e
