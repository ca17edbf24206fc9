"""Analytic FLOPs of the DiT programs: what a step must compute, not what XLA compiled.

Convention (as `benchmarks/wan_forward.py` and `benchmarks/train_step.py` report): matmul FLOPs, 2
per multiply-add; softmax, norms, elementwise work, the discriminator heads and the losses are not
counted. Per block: self-attention projections 8*T*D^2, cross-attention q/o 4*T*D^2 and k/v 4*L*D^2
on the L text tokens, FFN 4*T*D*F, self-attention scores and values 4*T*S*D (S = keys attended:
all T bidirectionally, the filled cache for a cached chunk, T/2 + T_chunk/2 on average
block-causally), cross-attention 4*T*L*D; plus the text embedding 2*L*(text_dim*D + D^2), patch
embedding and head. A backward pass counts 2x its forward; remat recomputation is not counted (it is
waste, as is padding to a kernel's block and computing masked blocks).

Training steps draw their exit index at random: the figures are expectations over that draw (the
rollout's exit index e uniform in 0..N-1, the discriminator's n uniform in 1..N-1).

Every count is a `Flops`: a float that carries its attention part (`.attention`: the scores and
values of self- and cross-attention, 4*T*S*D and 4*T*L*D a block), the work a flash kernel does
where XLA cannot see it (`asd_jax.plan.breakdown`).
"""

from __future__ import annotations

from typing import Sequence

from asd_jax.models import wan


class Flops(float):
  """A FLOP count (a float) with its attention part, `.attention`, kept through sums and scaling
  by numbers (so every count below composes both at once)."""

  def __new__(cls, total: float, attention: float = 0.0):
    self = super().__new__(cls, total)
    self.attention = float(attention)
    return self

  def __reduce__(self):
    return (Flops, (float(self), self.attention))

  def __add__(self, other):
    if isinstance(other, (int, float)):
      return Flops(float(self) + float(other), self.attention + getattr(other, "attention", 0.0))
    return NotImplemented

  __radd__ = __add__

  def __sub__(self, other):
    if isinstance(other, (int, float)):
      return Flops(float(self) - float(other), self.attention - getattr(other, "attention", 0.0))
    return NotImplemented

  def __rsub__(self, other):
    if isinstance(other, (int, float)):
      return Flops(float(other) - float(self), getattr(other, "attention", 0.0) - self.attention)
    return NotImplemented

  def __mul__(self, other):
    if isinstance(other, (int, float)) and not isinstance(other, Flops):
      return Flops(float(self) * other, self.attention * other)
    return NotImplemented

  __rmul__ = __mul__

  def __truediv__(self, other):
    if isinstance(other, (int, float)) and not isinstance(other, Flops):
      return Flops(float(self) / other, self.attention / other)
    return NotImplemented


def tokens(cfg: wan.WanConfig, frames: int, height: int, width: int) -> int:
  """Patch tokens of `frames` latent frames of height x width."""
  pt, ph, pw = cfg.patch_size
  return (frames // pt) * (height // ph) * (width // pw)


def forward_flops(cfg: wan.WanConfig, batch: int, tokens: int, keys: float, text_len: int) -> float:
  """Matmul FLOPs of one forward over `tokens` query tokens attending to `keys` keys (see above).

  text_len = 0 leaves out the text embedding and the cross-attention's text K/V projections (a
  cached chunk reads them from the cache) and the cross-attention itself.
  """
  D, F, L = cfg.dim, cfg.ffn_dim, text_len
  attention = 4 * tokens * keys * D + 4 * tokens * L * D
  per_block = (8 * tokens * D * D + 4 * tokens * D * D + 4 * L * D * D + 4 * tokens * D * F +
               attention)
  embed = (2 * L * (cfg.text_dim * D + D * D) + 2 * tokens * cfg.in_channels * cfg.patch_volume * D
           + 2 * tokens * D * cfg.out_channels * cfg.patch_volume)
  return Flops(batch * (cfg.num_layers * per_block + embed),
               attention=batch * cfg.num_layers * attention)


def cached_chunk_flops(cfg: wan.WanConfig, batch: int, tokens: int, cache_tokens: float,
                       text_len: int) -> float:
  """One `forward_chunk`: the chunk's tokens against `cache_tokens` filled keys (its own included)
  and the cached text K/V of `text_len` tokens."""
  cross = batch * cfg.num_layers * 4 * tokens * text_len * cfg.dim
  return forward_flops(cfg, batch, tokens, cache_tokens, 0) + Flops(cross, attention=cross)


def text_cache_flops(cfg: wan.WanConfig, batch: int, text_len: int) -> float:
  """`init_cache`: the text embedding and every block's cross-attention K/V."""
  D, L = cfg.dim, text_len
  return Flops(batch * (2 * L * (cfg.text_dim * D + D * D) + cfg.num_layers * 4 * L * D * D))


def generation_flops(cfg: wan.WanConfig, batch: int, latent: Sequence[int], chunk_frames: int,
                     steps_per_chunk: Sequence[float], text_len: int, *, refill_last: bool,
                     cache_frames: int | None = None) -> float:
  """A causal chunked generation: `steps_per_chunk[c]` forwards of chunk c, then its refill.

  latent: (F, H, W); keys of chunk c: the cache's filled frames (at most `cache_frames`).
  """
  F, H, W = latent[:3]
  n = F // chunk_frames
  tc = tokens(cfg, chunk_frames, H, W)
  capacity = F if cache_frames is None else min(cache_frames, F)
  total = text_cache_flops(cfg, batch, text_len)
  for c in range(n):
    keys = min((c + 1) * chunk_frames, capacity) // chunk_frames * tc
    refills = 1 if (c < n - 1 or refill_last) else 0
    total += (steps_per_chunk[c] + refills) * cached_chunk_flops(cfg, batch, tc, keys, text_len)
  return total


def _rollout(cfg, batch, latent, chunk_frames, exit_mean, text_len, *, grad: bool) -> float:
  """Self Forcing rollout at a mean exit index: e + 1 forwards and a refill per chunk; with grad,
  the exit forward's backward and the text K/V made with gradient (forward + backward)."""
  n = latent[0] // chunk_frames
  fwd = generation_flops(cfg, batch, latent, chunk_frames, [exit_mean + 1] * n, text_len,
                         refill_last=True)
  if not grad:
    return fwd
  exit_only = generation_flops(cfg, batch, latent, chunk_frames, [1] * n, text_len,
                               refill_last=False) - text_cache_flops(cfg, batch, text_len)
  return fwd + 2 * exit_only + 3 * text_cache_flops(cfg, batch, text_len)


def _bidirectional(cfg, batch, latent, text_len) -> float:
  t = tokens(cfg, *latent[:3])
  return forward_flops(cfg, batch, t, t, text_len)


def _disc_forward(cfg, batch, latent, text_len, taps) -> float:
  """The critic backbone up to its last tap (the heads are not counted)."""
  return _bidirectional(cfg, batch, latent, text_len) * (max(taps) + 1) / cfg.num_layers


def step_flops(name: str, *, stage: str, student: wan.WanConfig, critic: wan.WanConfig,
               teacher: wan.WanConfig | None, taps: Sequence[int], batch: int,
               latent: Sequence[int], chunk_frames: int, num_timesteps: int, text_len: int,
               alpha: float) -> float | None:
  """Expected analytic FLOPs of one training step `name` (generator, critic, disc) of a stage."""
  N, B, L = num_timesteps, batch, text_len
  e_mean = (N - 1) / 2
  if stage == "ode_init":  # one block-causal forward + backward of the student
    t, tc = tokens(student, *latent[:3]), tokens(student, chunk_frames, *latent[1:3])
    return 3 * forward_flops(student, B, t, (t + tc) / 2, L)
  if stage == "pretrain":
    return 3 * _bidirectional(student, B, latent, L)
  if name == "generator":
    total = _rollout(student, B, latent, chunk_frames, e_mean, L, grad=True)
    if teacher is not None:  # CFG: conditional and unconditional
      total += 2 * _bidirectional(teacher, B, latent, L)
    total += _bidirectional(critic, B, latent, L)
    if alpha > 0 and stage == "asd":
      partner = sum(min(e + 1, N - 1) for e in range(N)) / N
      total += _rollout(student, B, latent, chunk_frames, partner, L, grad=False)
      # Both samples through the backbone; the backward reaches the generator through x_n only.
      total += 2 * _disc_forward(critic, B, latent, L, taps) + 2 * _disc_forward(
          critic, B, latent, L, taps)
    return total
  if name == "critic":
    return (_rollout(student, B, latent, chunk_frames, e_mean, L, grad=False) +
            3 * _bidirectional(critic, B, latent, L))
  if name == "disc":  # rollouts at exits n - 1 and n, n uniform in 1..N-1
    exits = sum((n - 1) + n for n in range(1, N)) / max(N - 1, 1)
    rollouts = 2 * _rollout(student, B, latent, chunk_frames, exits / 2, L, grad=False)
    # Four batches through the backbone (both samples, both perturbed); heads only are trained.
    return rollouts + 4 * _disc_forward(critic, B, latent, L, taps)
  return None
