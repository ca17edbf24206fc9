"""The training job: config -> models, data, sharded state -> jitted steps in a resumable loop.

`train(config, workdir)` runs one stage (`pretrain`, `ode_init`, `dmd` or `asd`, see configs/);
the toy-world pipeline (`toy`: configs/toy.py) stands above it, in `asd_jax.toy.pipeline`, and the
entry point (`python -m asd_jax.train`) picks between the two. Everything is
checked before anything compiles; the state is created (or restored) directly in its shards; the
steps are jitted once with in/out shardings and state donation; checkpoints are written every
`checkpoint.every` steps, on SIGTERM and at the end; the EMA generator is exported to
`workdir/export` in the layout `asd_jax.pretrained.load` and `python -m asd_jax.sample` read.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from asd_jax.models import disc, wan
from asd_jax.train import sharding as shd
from asd_jax.train.checkpoint import Checkpointer
from asd_jax.train.config import STAGES, check_mesh, validate  # noqa: F401 (re-exported)
from asd_jax.train.data import make_source
from asd_jax.train.metrics import MetricsWriter, NonFiniteGuard
from asd_jax.train.programs import build_programs, heads_logical
from asd_jax.train.state import TrainState
from asd_jax.train.steps import cycle_substeps, run_cycle

def _params_or_init(path: str | None, cfg: wan.WanConfig, key, mesh, rules):
  """Params of a converted directory (read straight into shards) or a random init (sharded)."""
  logical = wan.logical_axes(cfg)
  if path:
    from asd_jax import pretrained  # pylint: disable=g-import-not-at-top
    abstract = wan.abstract_params(cfg)
    shardings = shd.logical_to_shardings(logical, mesh, rules, abstract)
    module, params = pretrained.load(path, shardings=shardings, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, remat_policy=cfg.remat_policy)
    if any(getattr(module.config, f) != getattr(cfg, f) for f in wan.WanConfig.ARCH_FIELDS):
      raise ValueError(f"{path} holds a {module.config.dim}-wide, {module.config.num_layers}-"
                       f"layer model; the config asks for {cfg.dim} and {cfg.num_layers}.")
    return params
  return shd.shard_init(lambda k: wan.init_params(cfg, k), mesh, logical, rules, args=(key,))


def toy_world(config: ml_collections.ConfigDict):
  """The toy world of a `data.toy` config (None otherwise)."""
  if not config.data.get("toy"):
    return None
  from asd_jax.toy.world import ToyConfig, ToyWorld  # pylint: disable=g-import-not-at-top
  return ToyWorld(ToyConfig(**config.toy.to_dict()))


def export_generator(params: Any, cfg: wan.WanConfig, out: str | Path, source: dict) -> Path:
  """Writes params as a converted Wan directory (config.json + params/), atomically."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = Path(out).absolute()
  tmp = out.with_name(out.name + ".tmp")
  if jax.process_index() == 0 and tmp.exists():
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(tmp)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp / "params", params)
    ckpt.wait_until_finished()
  if jax.process_index() == 0:
    arch = cfg.replace(dtype="float32", remat_policy="none").to_dict()
    (tmp / "config.json").write_text(json.dumps({"kind": "wan", "config": arch,
                                                 "source": source}, indent=2))
    # An existing export is moved aside and deleted only once the new one is in place.
    from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
    atomic.replace(tmp, out)
  return out


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
  """Runs the configured stage in `workdir` (resuming from its latest checkpoint)."""
  if config.stage == "toy":
    raise ValueError("stage 'toy' is the whole toy-world pipeline: run it with "
                     "asd_jax.toy.pipeline.run(config, workdir) or python -m asd_jax.train.")
  validate(config)
  c = config
  world = toy_world(c)
  workdir = Path(workdir)
  shd.initialize_distributed()
  mesh = shd.make_mesh(tuple(c.mesh_shape))
  check_mesh(c, mesh)
  rules = shd.DEFAULT_RULES
  key = jax.random.key(c.seed)
  k_gen, k_critic, k_teacher, k_heads, k_run = jax.random.split(key, 5)

  with jax.set_mesh(mesh):
    progs = build_programs(c, mesh, rules, world=world)
    distill = c.stage in ("dmd", "asd")
    ckpt = Checkpointer(workdir / "checkpoints", save_interval_steps=c.checkpoint.every,
                        max_to_keep=c.checkpoint.keep)
    # The newest checkpoint that reads (a damaged one is reported and moved aside), or None.
    restored = ckpt.restore_latest(progs.state)
    guard = NonFiniteGuard(c.max_nonfinite)
    meta_auc = {}  # the AUC watch's chance streak, restored with a checkpoint
    if restored is None:  # a fresh run: weights read (or drawn) straight into their shards
      generator = _params_or_init(c.init.student, progs.student_cfg, k_gen, mesh, rules)
      critic_params = (_params_or_init(c.init.critic or c.init.teacher, progs.critic_cfg,
                                       k_critic, mesh, rules) if distill else {})
      heads_params = (shd.shard_init(lambda k: disc.init_heads(progs.heads_cfg, k), mesh,
                                     heads_logical(progs.heads_cfg), rules, args=(k_heads,))
                      if progs.heads_cfg is not None else {})
      state = progs.init(k_run, generator, critic_params, heads_params)
      del generator, critic_params, heads_params  # the state holds copies
      start = 0
    else:  # resuming: the checkpoint has every trained network, no weights are read
      state, meta, start = restored
      guard.load_state(meta.get("guard", {}))
      meta_auc = meta.get("disc_auc", {})
    teacher_params = ({} if progs.teacher_cfg is None else
                      _params_or_init(c.init.teacher, progs.teacher_cfg, k_teacher, mesh, rules))
    source = make_source(c, teacher=progs.teacher, teacher_params=teacher_params,
                         timesteps=progs.timesteps, latent=progs.latent, world=world)
    # The teacher stays resident; every step takes it as its first argument.
    jitted = {name: functools.partial(fn, teacher_params) for name, fn in progs.steps.items()}

    ratio = progs.ratio
    per_cycle = sum(ratio)
    watch = None
    if progs.disc_auc is not None and c.asd.auc_every:
      from asd_jax.train.disc_auc import DiscAuc  # pylint: disable=g-import-not-at-top
      watch = DiscAuc(progs.disc_auc, source, rows=progs.auc_rows, batch_size=c.batch_size,
                      samples=c.asd.auc_samples, every=c.asd.auc_every,
                      patience=c.asd.auc_patience, mesh=mesh, rules=rules)
      watch.load_state(meta_auc)
    # Records are numbered by the step they complete: this run writes from start + 1 on (any
    # written after the checkpoint by a killed run are dropped).
    writer = MetricsWriter(workdir, total_steps=c.total_steps, start_step=start + 1,
                           progress=c.progress)
    step = start
    try:
      while step < c.total_steps:
        t0 = time.perf_counter()
        # Generator and critic batches do not depend on the discriminator's count (paired arms).
        batches = {name: [shd.global_batch(source(sub), mesh, rules) for sub in subs]
                   for name, subs in cycle_substeps(step, ratio).items()}
        state, metrics = run_cycle(jitted, state, batches, ratio)
        step += 1
        finite = not any(float(v) for k, v in metrics.items() if k.endswith("nonfinite"))
        seconds = time.perf_counter() - t0
        metrics["perf/cycle_seconds"] = seconds
        metrics["perf/samples_per_s"] = c.batch_size * per_cycle / seconds
        metrics["skipped_total"] = state.skipped
        guard.update(step, metrics, finite=finite)
        if watch is not None and watch.due(step, c.total_steps):
          metrics.update(watch(teacher_params, state))
        if step % c.log_every == 0 or step == c.total_steps:
          writer.write(step, metrics)
        # Saves every `checkpoint.every` steps, at the end, and on a preemption notice.
        ckpt.save(step, state, {"guard": guard.state(), "config": c.to_dict(),
                                "disc_auc": watch.state() if watch is not None else {}},
                  force=step == c.total_steps)
        if ckpt.should_stop():
          break
      ckpt.wait_until_finished()
    finally:
      writer.close()
      ckpt.close()
    if step >= c.total_steps and c.export:
      export_generator(state.generator_ema, progs.student_cfg, workdir / "export",
                       {"stage": c.stage, "step": int(step), "workdir": str(workdir)})
  return state
