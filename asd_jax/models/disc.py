"""Discriminator heads of Adversarial Self-Distillation (ALGORITHM.md section 7).

The discriminator D is the critic's (fake score's) Wan backbone plus these heads: for each tapped
block a set of learnable query tokens cross-attends to that block's output hidden states; the pooled
features of every tap are concatenated and an MLP maps them to N - 1 logits. D_n is logit n - 1
(n = 1..N-1 steps): all D_n share the backbone and the heads. The heads never see the timestep.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asd_jax.models.attention import attention
from asd_jax.models.wan_layers import Dense, _init, _layer_norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DiscConfig:
  """Shape of the heads. `dim` must equal the backbone's width."""
  dim: int = 1536
  taps: tuple[int, ...] = (12, 21, 29)  # 0-based blocks whose outputs the heads read
  num_queries: int = 4  # learnable query tokens per tap
  num_heads: int = 12  # attention heads of the cross-attention
  mlp_dim: int = 1024
  num_logits: int = 3  # N - 1 for an N-step generator
  eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
    if not self.taps:
      raise ValueError("the discriminator needs at least one tapped block.")
    if self.dim % self.num_heads:
      raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}.")
    if self.num_logits < 1:
      raise ValueError(f"num_logits must be >= 1, got {self.num_logits}.")


class _TapHead(nn.Module):
  """Query tokens cross-attending to one tap's hidden states -> pooled [B, dim] features."""
  cfg: DiscConfig

  @nn.compact
  def __call__(self, hidden_BTD: Array) -> Array:
    cfg = self.cfg
    B, _, D = hidden_BTD.shape
    heads, hd = cfg.num_heads, D // cfg.num_heads
    queries = self.param("queries", _init((None, "embed"), nn.initializers.normal(0.02)),
                         (cfg.num_queries, D), jnp.float32)
    h = _layer_norm(hidden_BTD, cfg.eps)
    q = Dense(D, ("embed", "qkv"), name="q")(queries)
    k = Dense(D, ("embed", "qkv"), name="k")(h)
    v = Dense(D, ("embed", "qkv"), name="v")(h)
    q = jnp.broadcast_to(q[None], (B,) + q.shape).reshape(B, cfg.num_queries, heads, hd)
    a = attention(q, k.reshape(B, -1, heads, hd), v.reshape(B, -1, heads, hd), impl="xla")
    out = Dense(D, ("qkv", "embed"), name="o")(a.reshape(B, cfg.num_queries, D))
    return jnp.mean(out, axis=1)


class DiscHeads(nn.Module):
  """hidden [num_taps, B, T, dim] (from `WanModel(..., taps=cfg.taps)`) -> logits [B, num_logits]."""
  cfg: DiscConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.cfg
    if hidden.shape[0] != len(cfg.taps) or hidden.shape[-1] != cfg.dim:
      raise ValueError(f"expected hidden states [{len(cfg.taps)}, B, T, {cfg.dim}], got "
                       f"{hidden.shape}.")
    feats = [_TapHead(cfg, name=f"tap_{i}")(hidden[i].astype(jnp.float32))
             for i in range(len(cfg.taps))]
    h = jnp.concatenate(feats, axis=-1)
    h = nn.silu(Dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1")(h))
    return Dense(cfg.num_logits, ("mlp", None), name="fc2")(h)


def init_heads(cfg: DiscConfig, rng: Array) -> Any:
  dummy = jnp.zeros((len(cfg.taps), 1, 2, cfg.dim), jnp.float32)
  return nn.unbox(DiscHeads(cfg).init(rng, dummy)["params"])


def discriminator_logits(backbone: Any, backbone_params: Any, heads: DiscHeads, heads_params: Any,
                         x_t: Array, t: Array, context: Array) -> Array:
  """All N - 1 logits of D on noisy latents x_t [B, F, H, W, C] at timesteps t [B] -> [B, N-1]."""
  _, hidden = backbone.apply({"params": backbone_params}, x_t, t, context, taps=heads.cfg.taps)
  return heads.apply({"params": heads_params}, hidden)
