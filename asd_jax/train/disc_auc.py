"""The discriminator watched: its held-out AUC at telling n-step from (n+1)-step samples.

A discriminator that never learns makes ASD inert (its loss sits at ln 2 and its gradient carries
nothing), and its training loss cannot show it: the relativistic loss stays near ln 2 whether D is
blind or balanced against a generator that keeps up. `DiscAuc` measures D directly: every
`asd.auc_every` steps, on a fixed pool of `asd.auc_samples` prompts with fixed noise that no
training step draws (`steps.AUC_STREAM`, `steps.AUC_STEP`), the current generator's n-step and
(n+1)-step samples are noised as the D step noises them and D_n scores them; the AUC per n
(`losses.pair_auc`) is logged as `disc_auc/n{n}` next to the logit gap. When every n's AUC stays
inside the chance band (`losses.auc_chance_band`: two standard errors of a blind D's AUC) for
`asd.auc_patience` evaluations in a row, a warning says so.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import jax
import numpy as np

from asd_jax.distill.losses import auc_chance_band, pair_auc
from asd_jax.train import sharding as shd
from asd_jax.train.steps import AUC_STREAM

_log = logging.getLogger(__name__)


class DiscAuc:
  """Held-out AUC of the discriminator, per n, every `every` steps (see the module docstring).

  source: the loop's data source (`train.data.make_source`); program: `Programs.disc_auc`;
  rows: `Programs.auc_rows`; batch_size: the global batch the source gives.
  """

  def __init__(self, program: Callable, source: Callable, *, rows: int, batch_size: int,
               samples: int, every: int, patience: int, mesh: Any, rules: Any):
    self.program, self.every, self.patience = program, every, patience
    per_call = batch_size // rows  # chunks in one source batch
    chunks = math.ceil(samples / rows)
    self.pool = []
    for i in range(math.ceil(chunks / per_call)):
      local = source(AUC_STREAM + i)
      local_rows = len(local["context"]) // per_call  # this process's rows of one chunk
      for j in range(per_call):
        if len(self.pool) < chunks:
          part = {k: v[j * local_rows:(j + 1) * local_rows] for k, v in local.items()}
          self.pool.append(shd.global_batch(part, mesh, rules))
    self.samples = chunks * rows
    self.band = auc_chance_band(self.samples, self.samples)
    self.at_chance = 0  # evaluations in a row with every AUC inside the band
    self.warned = False

  def due(self, step: int, total: int) -> bool:
    return self.every > 0 and (step % self.every == 0 or step == total)

  def __call__(self, teacher_params: Any, state: Any) -> dict[str, float]:
    """{'disc_auc/n1': ..., 'disc_auc/min': ..., 'disc_auc/chance_band': ...} of `state`."""
    scores = [jax.device_get(self.program(teacher_params, state, batch, np.int32(i)))
              for i, batch in enumerate(self.pool)]
    f_n = np.concatenate([s["f_n"] for s in scores], axis=1)  # [N - 1, samples]
    f_n1 = np.concatenate([s["f_n1"] for s in scores], axis=1)
    aucs = [pair_auc(f_n1[i], f_n[i]) for i in range(len(f_n))]
    out = {f"disc_auc/n{i + 1}": a for i, a in enumerate(aucs)}
    out["disc_auc/min"] = min(aucs)
    out["disc_auc/chance_band"] = self.band
    self.at_chance = self.at_chance + 1 if max(aucs) < 0.5 + self.band else 0
    out["disc_auc/at_chance_streak"] = float(self.at_chance)
    if self.at_chance >= self.patience and not self.warned:
      self.warned = True
      _log.warning(
          "the discriminator's held-out AUC has stayed at chance (every n below 0.5 + %.3f) for "
          "%d evaluations: D is not learning and ASD is inert. Raise optim.heads_lr, lower the "
          "noise (asd.t_law) or check asd.r_lambda / asd.r_form.", self.band, self.at_chance)
    return out

  def state(self) -> dict[str, int]:
    return {"at_chance": self.at_chance, "warned": int(self.warned)}

  def load_state(self, s: dict[str, int]) -> None:
    self.at_chance = int(s.get("at_chance", 0))
    self.warned = bool(s.get("warned", 0))
