"""The toy-world pipeline config (`configs/toy.py` and `python -m asd_jax.toy.ablation` read it).

Arguments (comma-separated):
- none: the README's quick start, sized to finish well within 15 minutes on 2 CPU cores (teacher
  net 600 steps, ODE initialisation 150 steps on 256 pairs solved once, DMD+ASD 100 updates, 32
  evaluation samples per class): a demonstration of the pipeline, not a measurement;
- `analytic`: the exact velocity as the teacher of DMD and the ODE pairs (the pretrained net still
  initialises the student and the critic);
- `ablation`: `analytic` with the longer budgets `python -m asd_jax.toy.ablation` measures with
  (teacher net 1,500 steps, ODE initialisation 600 steps on fresh pairs every step, 300 updates,
  128 evaluation samples per class: the set-up of docs/toy_results.md);
- `quick`: a few steps of each stage, a smoke run of a minute.

Toy-specific choices (the paper's values stay the defaults of every other config):
- dmd.guidance 0 and ode.guidance 1 (no CFG): the metrics score samples against the true class
  density, which guidance would distort on purpose;
- learning rates, batch sizes and step counts sized for models of ~0.2M parameters trained from
  scratch on 2 CPU cores (the paper fine-tunes 1.3B models at 2e-6).
"""

import dataclasses

import ml_collections

from asd_jax.toy.world import ToyConfig
from asd_jax.train.config import base_config


def get_config(arg=None):
  c = base_config("toy")
  c.seed = 0
  c.dtype = "float32"
  c.remat = "none"
  c.data.toy = True
  c.toy = ml_collections.ConfigDict(dataclasses.asdict(ToyConfig()))
  c.latent = ml_collections.ConfigDict(dict(frames=9, height=8, width=8))
  net = dict(preset="tiny", dim=64, ffn_dim=128, num_heads=2, num_layers=4, freq_dim=64,
             text_dim=32, in_channels=4, out_channels=4)
  for name in ("student", "teacher", "critic"):
    c.models[name] = ml_collections.ConfigDict(net)
  c.dmd.guidance = 0.0
  c.ode.guidance = 1.0
  c.ode.steps = 32
  c.asd.taps = (1, 2, 3)
  c.asd.num_queries = 4
  c.asd.mlp_dim = 128
  c.update_ratio = (1, 4, 1)
  # The DMD gradient per latent element scales as 1/numel and the ASD one roughly as
  # 1/sqrt(numel): on latents ~900x smaller than 832x480x81 video, the paper's alpha = 0.01 weighs
  # ASD ~30x less against DMD than in the paper. The toy runs at 0.1; the ablation sweeps 0.01
  # (the paper's value), 0.1 and 1.
  c.asd.alpha = 0.1
  c.checkpoint.every = 200
  c.checkpoint.keep = 1
  c.log_every = 1
  c.progress = True

  c.pipeline = ml_collections.ConfigDict(dict(
      teacher="trained",  # trained: a bidirectional Wan pretrained here | analytic: exact velocity
      # distillation runs from the one ODE initialisation: 'dmd' (the Self Forcing baseline),
      # 'asd' (alpha = asd.alpha), 'asd@A' (alpha = A)
      runs=("asd",),
      eval_samples=32,  # per class
      eval_seed=12345,
      teacher_steps=48,  # Euler steps of the teacher's reference samples
      teacher_dir="",  # a pretrained teacher export to use instead of pretraining one
  ))
  c.pipeline.teacher_net = ml_collections.ConfigDict(dict(
      total_steps=600, batch_size=32, lr=1e-3, b1=0.9, ema_start=200))
  c.pipeline.ode_init = ml_collections.ConfigDict(dict(
      total_steps=150, batch_size=16, lr=3e-4, b1=0.9,
      # the causal student starts from the pretrained bidirectional net, as the real student starts
      # from Wan 1.3B; False: from random weights
      from_teacher=True))
  c.ode.pool = 256  # the ODE pairs: 256 teacher solves made once (0: fresh ones every step)
  c.pipeline.distill = ml_collections.ConfigDict(dict(
      total_steps=100, batch_size=8, gen_lr=1e-4, critic_lr=1e-4))
  c.ema.start = 50

  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  if "ablation" in tokens:  # first, so that 'quick' can shorten it
    c.pipeline.teacher = "analytic"
    c.pipeline.teacher_net.total_steps = 1500
    c.pipeline.ode_init.total_steps = 600
    c.ode.pool = 0
    c.pipeline.distill.total_steps = 300
    c.ema.start = 100
    c.pipeline.eval_samples = 128
  for token in tokens:
    if token == "ablation":
      pass
    elif token == "analytic":
      c.pipeline.teacher = "analytic"
    elif token == "quick":
      c.pipeline.teacher_net.total_steps = 20
      c.pipeline.ode_init.total_steps = 10
      c.pipeline.distill.total_steps = 5
      c.pipeline.eval_samples = 16
      c.pipeline.teacher_steps = 8
      c.ode.steps = 8
      c.ode.pool = min(c.ode.pool, 32)
      c.ema.start = 2
      c.pipeline.teacher_net.ema_start = 2
    else:
      raise ValueError(f"unknown config argument {token!r}; use 'analytic', 'ablation' and/or "
                       f"'quick'.")
  return c
