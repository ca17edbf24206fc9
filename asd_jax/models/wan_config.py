"""`WanConfig`: architecture and execution settings of a Wan 2.1 DiT, with the 1.3B/14B/tiny presets."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture and execution settings of a Wan 2.1 DiT.

  The architecture fields match the original `WanModel` arguments; `config.json` written by the
  converter holds exactly `to_dict()`.
  """
  dim: int = 1536
  ffn_dim: int = 8960
  num_heads: int = 12
  num_layers: int = 30
  freq_dim: int = 256
  text_dim: int = 4096
  text_len: int = 512
  patch_size: tuple[int, int, int] = (1, 2, 2)
  in_channels: int = 16
  out_channels: int = 16
  eps: float = 1e-6
  qk_norm: bool = True
  cross_attn_norm: bool = True
  rope_max_len: int = 1024
  rope_theta: float = 10000.0
  # Execution (not architecture): free to change at load time.
  dtype: str = "float32"  # compute dtype of matmuls and attention: float32 | bfloat16
  param_dtype: str = "float32"
  precision: str | None = None  # lax.Precision for matmuls; "highest" for fp32 parity on TPU
  attention_impl: str = "auto"  # see asd_jax.models.attention
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  scan_layers: bool = True  # False unrolls the layer loop (faster run, slower compile)
  chunk_frames: int = 3  # latent frames per causal chunk

  ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len",
                 "patch_size", "in_channels", "out_channels", "eps", "qk_norm", "cross_attn_norm",
                 "rope_max_len", "rope_theta")

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    self.validate()

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def patch_volume(self) -> int:
    return math.prod(self.patch_size)

  def validate(self) -> None:
    if self.dim % self.num_heads:
      raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings.")
    if self.freq_dim % 2:
      raise ValueError(f"freq_dim {self.freq_dim} must be even.")
    if len(self.patch_size) != 3:
      raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                       f"got '{self.remat_policy}'.")
    if self.chunk_frames < 1:
      raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}.")

  def replace(self, **changes) -> "WanConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["patch_size"] = list(self.patch_size)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "WanConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown WanConfig fields {unknown}; known: {sorted(names)}.")
    return cls(**d)

  @classmethod
  def preset(cls, name: str, **overrides) -> "WanConfig":
    """'1.3b', '14b' (Wan 2.1 T2V) or 'tiny' (a few-thousand-parameter model for tests)."""
    key = name.lower().replace("wan", "").replace("-", "").replace("_", "").strip()
    if key not in PRESETS:
      raise ValueError(f"Unknown Wan preset '{name}'; choose one of {sorted(PRESETS)}.")
    return cls(**{**PRESETS[key], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "tiny": dict(dim=48, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=32),
}
