"""The toy-world pipeline config (`configs/toy.py` and `python -m asd_jax.toy.ablation` read it).

Arguments (comma-separated):
- none: the README's quick start, sized to finish well within 15 minutes on 2 CPU cores (teacher
  net 600 steps, ODE initialisation 150 steps on 256 pairs solved once, DMD+ASD 100 updates, 32
  evaluation samples per class): a demonstration of the pipeline, not a measurement;
- `analytic`: the exact velocity as the teacher of DMD and the ODE pairs (the pretrained net still
  initialises the student and the critic);
- `ablation`: `analytic` with the budgets `python -m asd_jax.toy.ablation` measures with
  (teacher net 600 steps, ODE initialisation 200 steps on fresh pairs every step, 100 updates,
  64 evaluation samples per class: the whole ablation within 2 hours on 2 CPU cores;
  docs/toy_results.md gives the measured time);
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


TOY_HEADS_LR = 1e-3
TOY_T_LAW = "uniform"


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
  # ASD ~30x less against DMD than in the paper, so the toy's equivalent of 0.01 is about 0.3.
  # The ablation sweeps 0.1, 0.3 and 1 against alpha 0.
  c.asd.alpha = 0.3
  # The discriminator: heads learning rate and noise law from the frozen-generator probe
  # (`python -m asd_jax.toy.disc_probe`, docs/toy_results.md), under which its held-out AUC
  # rises clearly above chance; the AUC is logged every 50 updates on 128 samples a side.
  c.optim.heads_lr = TOY_HEADS_LR
  c.asd.t_law = TOY_T_LAW
  c.asd.auc_every = 50
  c.asd.auc_samples = 128
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
      ode_dir="",  # an ODE-initialised student export to use instead of running ode_init
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
    c.pipeline.teacher_net.total_steps = 600
    c.pipeline.ode_init.total_steps = 200
    c.ode.pool = 0
    # 100 updates and 64 samples a class: the whole ablation (teacher net, ODE initialisation, 4
    # seeds x 4 arms, evaluation) within 2 hours on 2 CPU cores (docs/toy_results.md: measured).
    c.pipeline.distill.total_steps = 100
    c.ema.start = 100  # the evaluated generator is the last one (no EMA at this budget)
    c.pipeline.eval_samples = 64
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


def validate(c: ml_collections.ConfigDict) -> None:
  """Rejects a toy pipeline config that cannot work, naming the field, before any stage runs.

  The pipeline's own fields first (budgets, learning rates, runs, the world), then every stage
  config the pipeline derives from it through `asd_jax.train.config.validate` (the directories
  that earlier stages will write are not checked).
  """
  from asd_jax.toy import pipeline  # pylint: disable=g-import-not-at-top
  from asd_jax.train import config as run_config  # pylint: disable=g-import-not-at-top
  is_int, is_number, require = run_config.is_int, run_config.is_number, run_config.require
  p = c.pipeline
  require(c, "pipeline.teacher", lambda v: v in ("trained", "analytic"), "'trained' or 'analytic'")
  require(c, "pipeline.runs", lambda v: len(v) >= 1 and not isinstance(v, str),
          "a non-empty tuple of 'dmd', 'asd' or 'asd@ALPHA'")
  for name in p.runs:
    try:
      pipeline.run_alpha(name, c.asd.alpha)
    except ValueError as e:
      raise ValueError(f"pipeline.runs: {e}") from None
  if len(set(p.runs)) != len(p.runs):
    raise ValueError(f"pipeline.runs {tuple(p.runs)} names a run twice.")
  positive_int = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
  for name in ("pipeline.eval_samples", "pipeline.teacher_steps",
               "pipeline.teacher_net.total_steps", "pipeline.teacher_net.batch_size",
               "pipeline.ode_init.total_steps", "pipeline.ode_init.batch_size",
               "pipeline.distill.total_steps", "pipeline.distill.batch_size"):
    require(c, name, *positive_int)
  require(c, "pipeline.eval_seed", is_int, "an integer")
  require(c, "pipeline.teacher_net.ema_start", lambda v: is_int(v) and v >= 0, "an integer >= 0")
  for name in ("pipeline.teacher_net.lr", "pipeline.ode_init.lr", "pipeline.distill.gen_lr",
               "pipeline.distill.critic_lr"):
    require(c, name, lambda v: is_number(v) and v > 0, "a learning rate > 0")
  for name in ("pipeline.teacher_net.b1", "pipeline.ode_init.b1"):
    require(c, name, lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)")
  require(c, "pipeline.ode_init.from_teacher", lambda v: isinstance(v, bool), "True or False")
  if p.teacher_dir:
    from pathlib import Path  # pylint: disable=g-import-not-at-top
    if not (Path(p.teacher_dir) / "config.json").is_file():
      raise FileNotFoundError(f"pipeline.teacher_dir = {p.teacher_dir} is not a converted model "
                              f"directory (no config.json); give a pretrained teacher's export.")
  for name in ("num_classes", "frames", "height", "width", "channels", "text_tokens",
               "text_dim"):
    require(c, f"toy.{name}", *positive_int)
  for name in ("sigma_d", "blob_width"):
    require(c, f"toy.{name}", lambda v: is_number(v) and v > 0, "a number > 0")
  require(c, "toy.modes_per_class", lambda v: is_int(v) and v >= 2 and v % 2 == 0,
          "an even integer >= 2 (modes come in pairs)")
  require(c, "toy.fork_frame", lambda v: is_int(v) and 0 < v < c.toy.frames,
          f"in (0, toy.frames = {c.toy.frames})")
  teacher, student = "<the teacher stage's export>", "<the ode_init stage's export>"
  stages = [pipeline.stage_config(c, "ode_init", teacher_dir=teacher)]
  if not p.teacher_dir:
    stages.insert(0, pipeline.stage_config(c, "pretrain"))
  for name in p.runs:
    stage, alpha = pipeline.run_alpha(name, c.asd.alpha)
    stages.append(pipeline.stage_config(c, stage, teacher_dir=teacher, student_dir=student,
                                        alpha=alpha))
  for s in stages:
    run_config.validate(s, check_paths=False)
