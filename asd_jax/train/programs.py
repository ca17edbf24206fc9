"""The jitted programs of a training stage, with their abstract (sharded) inputs.

`build_programs(config, mesh)` is the one place that turns a run config into what runs on the
devices: the networks' configs, the optimizers, the state's sharded initialisation and every step,
jitted once with in/out shardings and state donation. The training loop calls it and feeds the
programs real arrays; `python -m asd_jax.plan` calls it and compiles the same programs for a target
that is not attached, from `Programs.args` (ShapeDtypeStructs carrying NamedShardings: nothing of
real size is allocated).

Every step takes the frozen teacher's params as its first argument (kept even where the step does
not read them, `keep_unused=True`): they stay resident on the devices for the whole run, so each
step's memory figures include them. The loop binds them once with `functools.partial`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asd_jax import targets
from asd_jax.diffusion import warp_timesteps
from asd_jax.models import disc, wan
from asd_jax.train import sharding as shd
from asd_jax.train.state import TrainState, init_state, make_optimizer
from asd_jax.train.steps import StepConfig, make_ode_step, make_pretrain_step, make_steps

ANALYTIC = "analytic"  # models.teacher.preset of the toy world's exact teacher
STEP_NAMES = ("generator", "critic", "disc")


def wan_config(spec: ml_collections.ConfigDict, dtype: str, remat: str) -> wan.WanConfig:
  """The WanConfig of one `config.models.<name>` entry."""
  spec = dict(spec)
  preset = spec.pop("preset")
  return wan.WanConfig.preset(preset, dtype=dtype, remat_policy=remat, **spec)


def heads_logical(cfg: disc.DiscConfig) -> Any:
  boxed = jax.eval_shape(lambda: disc.DiscHeads(cfg).init(
      jax.random.key(0), jnp.zeros((len(cfg.taps), 1, 2, cfg.dim))))
  return nn.get_partition_spec(boxed)["params"]


def _state_logical(abstract: TrainState, gen_tx, critic_tx, heads_tx, gen_logical,
                   critic_logical, heads_logical_) -> TrainState:
  return TrainState(
      step=P(), generator=gen_logical, generator_ema=gen_logical, critic=critic_logical,
      heads=heads_logical_,
      gen_opt=shd.opt_state_logical(gen_tx, abstract.gen_opt, gen_logical),
      critic_opt=shd.opt_state_logical(critic_tx, abstract.critic_opt, critic_logical),
      heads_opt=shd.opt_state_logical(heads_tx, abstract.heads_opt, heads_logical_),
      rng=P(), skipped=P())


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


@dataclasses.dataclass
class Programs:
  """What a stage runs. `steps[name](teacher_params, state, batch[, index])`, `init(rng, generator,
  critic, heads)`; `args[name]` holds abstract arguments of each ('init' included) with their
  shardings, `ratio` how many of each step an update-ratio cycle runs."""
  mesh: Mesh
  rules: Any
  student_cfg: wan.WanConfig
  critic_cfg: wan.WanConfig
  teacher_cfg: wan.WanConfig | None  # None: no Wan teacher (pretraining, the analytic teacher)
  heads_cfg: disc.DiscConfig | None
  timesteps: tuple[float, ...]
  latent: tuple[int, int, int, int]  # F, H, W, C
  ratio: tuple[int, int, int]
  teacher: Any  # the teacher module (None for pretraining)
  teacher_shardings: Any  # of its params ({} when it has none)
  state: TrainState  # abstract, sharded
  state_shardings: TrainState
  net_shardings: tuple[Any, Any, Any]  # generator, critic, heads params
  init: Callable
  steps: dict[str, Callable]
  args: dict[str, tuple]
  # ASD stages: `disc_auc(teacher_params, state, batch, chunk)` -> D_n's scores on one
  # microbatch-sized chunk of the held-out pool (`steps.make_steps`' disc_auc); else None.
  disc_auc: Callable | None = None
  auc_rows: int = 0  # rows of one chunk (the microbatch: batch_size / accumulation steps)


def build_programs(config: ml_collections.ConfigDict, mesh: Mesh,
                   rules: Any = shd.DEFAULT_RULES, *, world: Any = None) -> Programs:
  """The jitted programs of a validated stage config over `mesh` (see the module docstring).

  Args:
    config: a run config (`asd_jax.train.loop.validate` passed).
    mesh: the device mesh (real or compile-only devices).
    rules: logical-axis sharding rules.
    world: the toy world of a `data.toy` config (its analytic teacher and text), else None.
  """
  c = config
  distill = c.stage in ("dmd", "asd")
  use_heads = c.stage == "asd"
  student_cfg = wan_config(c.models.student, c.dtype, c.remat)
  critic_cfg = wan_config(c.models.critic, c.dtype, c.remat) if distill else student_cfg
  timesteps = warp_timesteps(c.timesteps, c.shift)
  latent = (c.latent.frames, c.latent.height, c.latent.width, student_cfg.in_channels)
  heads_cfg = (disc.DiscConfig(dim=critic_cfg.dim, taps=tuple(c.asd.taps),
                               num_queries=c.asd.num_queries, num_heads=critic_cfg.num_heads,
                               mlp_dim=c.asd.mlp_dim, num_logits=len(timesteps) - 1)
               if use_heads else None)
  o = c.optim
  opt = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
  gen_tx = make_optimizer(o.gen_lr, **opt)
  critic_tx = make_optimizer(o.critic_lr, **opt)
  heads_tx = make_optimizer(o.heads_lr, **opt)

  def make_state(rng, generator, critic, heads):
    return init_state(generator, critic, heads, gen_tx=gen_tx, critic_tx=critic_tx,
                      heads_tx=heads_tx, rng=rng)

  rng = jax.eval_shape(lambda: jax.random.key(0))
  nets = (wan.abstract_params(student_cfg),
          wan.abstract_params(critic_cfg) if distill else {},
          jax.eval_shape(lambda k: disc.init_heads(heads_cfg, k), rng) if use_heads else {})
  nets_logical = (wan.logical_axes(student_cfg),
                  wan.logical_axes(critic_cfg) if distill else {},
                  heads_logical(heads_cfg) if use_heads else {})
  net_shardings = tuple(shd.logical_to_shardings(lg, mesh, rules, a)
                        for lg, a in zip(nets_logical, nets))
  abstract = jax.eval_shape(make_state, rng, *nets)
  state_shardings = shd.logical_to_shardings(
      _state_logical(abstract, gen_tx, critic_tx, heads_tx, *nets_logical), mesh, rules, abstract)
  state = _with_shardings(abstract, state_shardings)

  # The frozen teacher: a Wan DiT, the toy world's exact velocity (no params), or none.
  teacher, teacher_cfg, teacher_shardings, teacher_abstract = None, None, {}, {}
  if c.stage != "pretrain":
    if c.models.teacher.preset == ANALYTIC:
      from asd_jax.toy.teacher import AnalyticTeacher  # pylint: disable=g-import-not-at-top
      teacher = AnalyticTeacher(world)
    else:
      teacher_cfg = wan_config(c.models.teacher, c.dtype, c.remat)
      teacher = wan.WanModel(teacher_cfg)
      teacher_abstract = wan.abstract_params(teacher_cfg)
      teacher_shardings = shd.logical_to_shardings(wan.logical_axes(teacher_cfg), mesh, rules,
                                                   teacher_abstract)
      teacher_abstract = _with_shardings(teacher_abstract, teacher_shardings)

  student = wan.WanModel(student_cfg)

  def make(teacher_params):
    if distill:
      return make_steps(
          generator=student, critic=wan.WanModel(critic_cfg), teacher=teacher,
          teacher_params=teacher_params, heads=disc.DiscHeads(heads_cfg) if use_heads else None,
          gen_tx=gen_tx, critic_tx=critic_tx, heads_tx=heads_tx,
          cfg=StepConfig(timesteps=timesteps, latent_shape=latent, chunk_frames=c.chunk_frames,
                         alpha=c.asd.alpha, guidance=c.dmd.guidance, shift=c.shift,
                         t_min=c.dmd.t_min, t_max=c.dmd.t_max, r_lambda=c.asd.r_lambda,
                         r_sigma=c.asd.r_sigma, t_law=c.asd.t_law, r_form=c.asd.r_form,
                         ema_decay=c.ema.decay, ema_start=c.ema.start,
                         accum=accum), micro_sharding=micro_shard)
    if c.stage == "pretrain":
      if accum > 1:
        raise ValueError("device_batch (gradient accumulation) is for stages ode_init, dmd and "
                         "asd; give pretraining device_batch = 0.")
      return {"generator": make_pretrain_step(
          model=student, tx=gen_tx, shift=c.pretrain.shift, t_min=c.pretrain.t_min,
          t_max=c.pretrain.t_max, cfg_dropout=c.pretrain.cfg_dropout, ema_decay=c.ema.decay,
          ema_start=c.ema.start)}
    return {"generator": make_ode_step(student=student, tx=gen_tx, timesteps=timesteps,
                                       chunk_frames=c.chunk_frames, accum=accum,
                                       micro_sharding=micro_shard)}

  ratio = tuple(int(r) for r in c.update_ratio) if distill else (1, 0, 0)
  batch_shard = shd.batch_sharding(mesh, rules)
  accum = accum_steps(c, mesh, rules)
  micro_shard = NamedSharding(mesh, P(None, *batch_shard.spec))
  replicated = NamedSharding(mesh, P())
  batch = _abstract_batch(c, student_cfg, latent, len(timesteps), world, batch_shard)
  index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  steps, args = {}, {}
  options = targets.training_compiler_options(mesh.devices)
  for name, count in zip(STEP_NAMES, ratio):
    if not count:
      continue

    def step(teacher_params, state, batch, *index, name=name):
      return make(teacher_params)[name](state, batch, *index)

    extra = () if name == "generator" else (replicated,)
    steps[name] = jax.jit(step, in_shardings=(teacher_shardings, state_shardings, batch_shard)
                          + extra, out_shardings=(state_shardings, replicated), donate_argnums=1,
                          keep_unused=True, compiler_options=options)
    args[name] = (teacher_abstract, state, batch) + (() if name == "generator" else (index,))
  init = jax.jit(make_state, out_shardings=state_shardings, compiler_options=options)
  disc_auc, auc_rows = None, 0
  if use_heads:  # one microbatch of the pool a call: the activations a training step holds
    auc_rows = c.batch_size // accum
    disc_auc = jax.jit(lambda teacher_params, state, batch, chunk: make(teacher_params)[
        "disc_auc"](state, batch, chunk), in_shardings=(teacher_shardings, state_shardings,
                                                        batch_shard, replicated),
        out_shardings=replicated, compiler_options=options)
  args["init"] = (jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated),
                  *(_with_shardings(a, s) for a, s in zip(nets, net_shardings)))
  return Programs(mesh=mesh, rules=rules, student_cfg=student_cfg, critic_cfg=critic_cfg,
                  teacher_cfg=teacher_cfg, heads_cfg=heads_cfg, timesteps=timesteps,
                  latent=latent, ratio=ratio, teacher=teacher,
                  teacher_shardings=teacher_shardings, state=state,
                  state_shardings=state_shardings, net_shardings=net_shardings, init=init,
                  steps=steps, args=args, disc_auc=disc_auc, auc_rows=auc_rows)


def accum_steps(config: ml_collections.ConfigDict, mesh: Mesh,
                rules: Any = shd.DEFAULT_RULES) -> int:
  """Microbatches per step: batch_size / (device_batch x the devices the batch is split over)."""
  n = int(config.get("device_batch", 0))
  if n < 0:
    raise ValueError(f"device_batch must be >= 0 (0: the whole batch at once), got {n}.")
  if n == 0:
    return 1
  axes = shd.batch_sharding(mesh, rules).spec[0] or ()
  devices = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  if config.batch_size % (n * devices):
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of device_batch {n} x the "
                     f"{devices} devices the batch is split over; change one of them.")
  return config.batch_size // (n * devices)


def _abstract_batch(c: ml_collections.ConfigDict, cfg: wan.WanConfig, latent, num_timesteps: int,
                    world: Any, sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of a step as `asd_jax.train.data.make_source` gives it (float32 arrays)."""
  B = c.batch_size
  text = (B,) + (tuple(world.text.shape[-2:]) if world is not None else
                 (c.data.text_len, cfg.text_dim))
  shapes = {"context": text}
  if c.stage == "ode_init":
    shapes.update(noisy=(B, num_timesteps) + latent, clean=(B,) + latent)
  else:
    shapes["neg_context"] = text
    if c.stage == "pretrain":
      shapes["clean"] = (B,) + latent
  return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding) for k, s in shapes.items()}
