"""The run config shared by configs/{ode_init,self_forcing,asd,...}.py, with the paper's values.

Every constant of ALGORITHM.md is a field here; `apply_arg` reads the config argument of
`--config=configs/NAME.py:ARG`: comma-separated `tiny` (a few-step CPU run with tiny random models
and synthetic prompts) and `teacher=1.3b` (a 1.3B teacher for one-GPU setups).
"""

from __future__ import annotations

import ml_collections


def base_config(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage  # pretrain | ode_init | dmd | asd (| toy: the whole toy-world pipeline)
  c.seed = 0
  c.dtype = "bfloat16"  # compute dtype; params and optimizer states stay float32
  c.remat = "full"  # remat policy of every Wan block (gradient checkpointing)
  c.chunk_frames = 3
  c.shift = 5.0
  c.timesteps = (1000.0, 750.0, 500.0, 250.0)  # warped with `shift`: 1000, 937.5, 833.3, 625
  c.latent = ml_collections.ConfigDict(dict(frames=21, height=60, width=104))  # 832x480, 81 fr.
  c.models = ml_collections.ConfigDict()
  c.models.student = ml_collections.ConfigDict(dict(preset="1.3b"))
  # The frozen teacher is stored in bfloat16: Self Forcing wraps it in FSDP with bfloat16
  # mixed precision, so every one of its params enters the forward rounded to bfloat16 anyway;
  # stored that way it takes half the memory (28 GB instead of 57 GB for Wan 14B). Set
  # models.teacher.param_dtype = "float32" to keep float32 storage.
  c.models.teacher = ml_collections.ConfigDict(dict(preset="14b", param_dtype="bfloat16"))
  c.models.critic = ml_collections.ConfigDict(dict(preset="1.3b"))
  # Converted model directories (`python -m asd_jax.convert wan`, or a previous stage's export).
  c.init = ml_collections.ConfigDict(dict(student="", teacher="", critic=""))
  c.data = ml_collections.ConfigDict(dict(prompts="", ode_pairs="", synthetic_prompts=64,
                                          text_len=512, toy=False))  # toy: configs/toy.py
  c.batch_size = 64  # global
  # Samples per device in one forward/backward. 0: the whole global batch at once (batch_size /
  # batch devices each). n > 0: every step accumulates its gradient over batch_size / (n x batch
  # devices) microbatches of n samples a device; the update is still the whole batch's, so a
  # slice smaller than Self Forcing's 64 GPUs keeps the global batch of 64.
  c.device_batch = 0
  c.total_steps = 3000  # generator updates (update-ratio cycles)
  c.update_ratio = (1, 4, 1)  # generator : critic : discriminator
  c.optim = ml_collections.ConfigDict(dict(
      gen_lr=2e-6, critic_lr=4e-7, heads_lr=0.0,  # heads_lr 0: same as the critic
      b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=10.0))
  c.ema = ml_collections.ConfigDict(dict(decay=0.99, start=200))
  c.dmd = ml_collections.ConfigDict(dict(guidance=3.0, t_min=20.0, t_max=980.0))
  c.asd = ml_collections.ConfigDict(dict(
      alpha=0.01, r_lambda=600.0, r_sigma=0.05, taps=(12, 21, 29), num_queries=4, mlp_dim=1024))
  # ODE pairs made by the loop itself when no data.ode_pairs is given: `steps` Euler steps,
  # CFG `guidance`; `pool` 0 solves fresh pairs every step, N > 0 solves N examples once at
  # start and trains on them as on a built pair dataset.
  c.ode = ml_collections.ConfigDict(dict(steps=48, guidance=6.0, pool=0))
  # Stage 'pretrain' (flow matching on data; the toy world's teacher): timestep law and the
  # share of rows trained unconditionally (on the negative context) for CFG.
  c.pretrain = ml_collections.ConfigDict(dict(shift=1.0, t_min=1.0, t_max=1000.0,
                                              cfg_dropout=0.1))
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3))
  c.log_every = 1
  c.max_nonfinite = 20  # stop after this many non-finite updates in a row
  c.progress = True
  c.export = True  # write the EMA generator to WORKDIR/export at the end
  return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    if token == "tiny":
      _tiny(c)
    elif token.startswith("teacher="):
      c.models.teacher.preset = token.split("=", 1)[1]
    else:
      raise ValueError(f"unknown config argument {token!r}; use 'tiny' and/or 'teacher=1.3b'.")
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Tiny random models, synthetic prompts, 6x4x4 latents: a few steps on a laptop CPU."""
  for name in ("student", "teacher", "critic"):
    c.models[name] = ml_collections.ConfigDict(dict(preset="tiny", text_dim=32, in_channels=16,
                                                    out_channels=16))
  c.dtype = "float32"
  c.remat = "none"
  c.latent = ml_collections.ConfigDict(dict(frames=6, height=4, width=4))
  c.data.synthetic_prompts = 8
  c.data.text_len = 16
  c.batch_size = 1
  c.device_batch = 0
  c.mesh_shape = (-1, 1, 1)
  c.total_steps = 3
  c.ema.start = 1
  c.asd.taps = (0, 1)
  c.asd.num_queries = 2
  c.asd.mlp_dim = 32
  c.ode.steps = 8
  c.checkpoint.every = 2
