"""Device meshes, logical-axis sharding rules, sharded state creation and multi-process setup.

Sharding is data. Every parameter carries logical axis names where it is made (for the Wan DiT,
`wan.logical_axes(cfg)`: 'layers', 'embed', 'qkv', 'mlp', ...); a short table of rules maps those
names onto the axes of a 3-axis device mesh:

  data    pure data parallelism (the batch is split, the state replicated)
  fsdp    the batch is split and the parameters' 'embed' axis too (ZeRO-3 style)
  tensor  the heads / qkv / mlp axes of the parameters (Megatron style)

Large state is never built whole on one device: `shard_init` traces the init function abstractly
(`jax.eval_shape`), derives a sharding for every leaf and compiles the init with those
`out_shardings`, so each device only ever allocates its own shards:

  mesh = make_mesh((-1, 1, 1))                      # all devices on 'data'
  params = shard_init(lambda: wan.init_params(cfg, key), mesh, lambda _: wan.logical_axes(cfg))

Multi-process runs (TPU pod slices, SLURM GPU clusters) call `initialize_distributed()` first
thing; it is a no-op on one host.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXIS_NAMES", "DEFAULT_RULES", "make_mesh", "logical_to_spec", "logical_to_shardings",
           "abstract_sharded", "shard_init", "opt_state_logical", "batch_sharding",
           "global_batch", "detect_multiprocess", "initialize_distributed", "is_main_process"]

AXIS_NAMES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). Names that are not
# listed ('text_embed', 'freq', 'modulation', 'embed_out', ...) are replicated. Where a rule would
# split a dimension whose size is not divisible by its mesh axes' size, that dimension of that
# array is replicated instead (its other dimensions keep their rules) and a warning names it.
# A config can carry its own table as a tuple of (name, axes) pairs.
MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
)

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Meshes.


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1),
              axis_names: Sequence[str] = AXIS_NAMES, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A device mesh of the given shape over all (global) devices.

  Args:
    mesh_shape: devices along each axis; one entry may be -1, filled in from the device count.
    axis_names: one name per axis of `mesh_shape`.
    devices: default `jax.devices()` (every device of every process).

  Returns:
    A `Mesh` with `AxisType.Auto` axes (shardings propagate through the compiler, as GSPMD).
    Use it with `jax.set_mesh(mesh)` or through `NamedSharding`s. On TPU the device order follows
    the physical topology; across several TPU slices the 'data' axis (the first) spans the slices
    (when its size is a multiple of their number), so only data-parallel gradient reductions
    cross the slow data-centre network. On multi-node GPUs devices are ordered process by
    process, so the last axes ('tensor', then 'fsdp') stay inside a node.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in mesh_shape]
  axis_names = tuple(axis_names)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} has {len(shape)} axes but axis_names "
                     f"{axis_names} has {len(axis_names)}.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)}: use positive sizes and at most one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)} over axes {axis_names}: {len(devices)} "
                       f"devices are not divisible by the fixed axes' product {known}.")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} over axes {axis_names} needs "
                     f"{math.prod(shape)} devices but there are {len(devices)}; change the "
                     f"shape or put -1 on one axis to fill it in.")
  axis_types = (AxisType.Auto,) * len(shape)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1 and shape[0] % num_slices:
    _log.warning("the devices span %d slices but the first mesh axis %r (size %d) is not a "
                 "multiple of it: other axes will cross the slow links between slices.",
                 num_slices, axis_names[0], shape[0])
  elif num_slices > 1:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    ici = (shape[0] // num_slices, *shape[1:])
    dcn = (num_slices,) + (1,) * (len(shape) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, axis_names, axis_types=axis_types)
  return jax.make_mesh(tuple(shape), axis_names, axis_types, devices=devices)


# ----------------------------------------------------------------------------------------------
# Logical axis names -> shardings.


def _rules_table(rules: Rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
  table = {}
  for name, axes in rules:
    if name in table:
      raise ValueError(f"logical axis {name!r} appears twice in the sharding rules.")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
      raise ValueError(f"sharding rule {name!r} -> {axes} names mesh axes {unknown} that the "
                       f"mesh {dict(mesh.shape)} does not have.")
    table[name] = axes
  return table


def _spec(logical: P | None, shape: tuple[int, ...] | None, mesh: Mesh,
          table: dict[str, tuple[str, ...]], where: str, fallbacks: list[str]) -> P:
  """The mesh PartitionSpec of one leaf; see `logical_to_spec`."""
  names = tuple(logical) if logical is not None else ()
  if shape is not None and len(names) > len(shape):
    raise ValueError(f"{where}: logical axes {names} have more entries than the leaf's shape "
                     f"{tuple(shape)}.")
  used: set[str] = set()
  out = []
  for dim, name in enumerate(names):
    group = name if isinstance(name, tuple) else (name,)
    axes = tuple(a for n in group if n is not None for a in table.get(n, ()) if a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and shape is not None and shape[dim] % size:
      fallbacks.append(f"{where} dim {dim} (size {shape[dim]}, {name!r} -> {axes} of size {size})")
      axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_to_spec(logical: P | None, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    shape: Sequence[int] | None = None) -> P:
  """The mesh PartitionSpec of one array from its logical axis names.

  Each logical name maps through `rules` (unlisted names and None replicate). A mesh axis is used
  at most once per array (a later dimension asking for it again is replicated). With `shape`, a
  dimension whose size is not divisible by the product of its mesh axes is replicated instead
  (logged as a warning) rather than padded; the array's other dimensions keep their sharding.
  """
  fallbacks: list[str] = []
  spec = _spec(logical, None if shape is None else tuple(shape), mesh, _rules_table(rules, mesh),
               "array", fallbacks)
  if fallbacks:
    _log.warning("replicating instead of sharding: %s", fallbacks[0])
  return spec


def _is_logical_leaf(x: Any) -> bool:
  return x is None or isinstance(x, P)


def _leaf_shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def logical_to_shardings(logical_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                         shapes_tree: Any = None) -> Any:
  """A `NamedSharding` tree from a tree of logical PartitionSpecs.

  Args:
    logical_tree: PartitionSpecs of logical axis names (or None = replicated). With `shapes_tree`
      it may be a prefix of it: one spec (often `None` or `P()`) then covers a whole subtree.
    mesh: the device mesh.
    rules: (logical name, mesh axes) pairs; see `DEFAULT_RULES`.
    shapes_tree: arrays or `jax.ShapeDtypeStruct`s; when given, the result has its structure and
      any dimension not divisible by its mesh axes is replicated (see `logical_to_spec`; one
      warning lists them all).

  Returns:
    A pytree of `NamedSharding`s (shaped like `shapes_tree` when given, else like
    `logical_tree`).
  """
  table = _rules_table(rules, mesh)
  fallbacks: list[str] = []

  if shapes_tree is None:
    out = jax.tree.map(lambda s: NamedSharding(mesh, _spec(s, None, mesh, table, "", fallbacks)),
                       logical_tree, is_leaf=_is_logical_leaf)
  else:
    def per_subtree(path, spec, subtree):
      def per_leaf(sub_path, leaf):
        where = jax.tree_util.keystr(path + sub_path) or "leaf"
        return NamedSharding(mesh, _spec(spec, _leaf_shape(leaf), mesh, table, where, fallbacks))
      return jax.tree_util.tree_map_with_path(per_leaf, subtree)

    try:
      out = jax.tree_util.tree_map_with_path(per_subtree, logical_tree, shapes_tree,
                                             is_leaf=_is_logical_leaf)
    except ValueError as e:
      raise ValueError(f"the logical axes tree does not match the state's structure (it must be "
                       f"equal or a prefix of it): {e}") from None
  if fallbacks:
    _log.warning("%d array dimension(s) are not divisible by their mesh axes and are replicated "
                 "instead: %s%s", len(fallbacks), "; ".join(fallbacks[:10]),
                 " ..." if len(fallbacks) > 10 else "")
  return out


LogicalArg = Any  # a logical tree, or a callable(abstract state) -> logical tree


def abstract_sharded(init_fn: Callable[..., Any], mesh: Mesh, logical: LogicalArg,
                     rules: Rules = DEFAULT_RULES, *, args: Sequence[Any] = ()) -> Any:
  """`jax.eval_shape(init_fn, *args)` with the sharding of every leaf filled in.

  This is the target for `Checkpointer.restore` and the source of the train step's in/out
  shardings; it allocates nothing.

  Args:
    init_fn: builds the state pytree from `args` (e.g. an rng key).
    mesh: the device mesh.
    logical: a tree of logical PartitionSpecs (equal to or a prefix of the state's structure),
      or a callable taking the abstract state (ShapeDtypeStructs) and returning one.
    rules: see `DEFAULT_RULES`.
    args: arguments of `init_fn`.

  Returns:
    The state as `jax.ShapeDtypeStruct`s whose `.sharding` are `NamedSharding`s on `mesh`.
  """
  abstract = jax.eval_shape(init_fn, *args)
  logical_tree = logical(abstract) if callable(logical) else logical
  shardings = logical_to_shardings(logical_tree, mesh, rules, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def shard_init(init_fn: Callable[..., Any], mesh: Mesh, logical: LogicalArg,
               rules: Rules = DEFAULT_RULES, *, args: Sequence[Any] = ()) -> Any:
  """Runs `init_fn(*args)` so that every leaf is created directly in its shards.

  eval_shape -> shardings from the logical names -> `jax.jit(init_fn, out_shardings=...)`: no
  device (or host) ever holds a whole large leaf. Arguments as for `abstract_sharded`; the
  values equal those of an unsharded `init_fn(*args)`.

  Returns:
    The state pytree of `jax.Array`s sharded on `mesh`.
  """
  abstract = abstract_sharded(init_fn, mesh, logical, rules, args=args)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  # The arguments (keys, small configs) are replicated: valid on any number of processes.
  in_shardings = NamedSharding(mesh, P()) if args else None
  return jax.jit(init_fn, in_shardings=in_shardings, out_shardings=shardings)(*args)


def opt_state_logical(optimizer: Any, opt_state: Any, params_logical: Any) -> Any:
  """Logical axes of an optax state: parameter-shaped leaves (moments) follow `params_logical`.

  Args:
    optimizer: the `optax.GradientTransformation` that made `opt_state`.
    opt_state: its state (arrays or `jax.eval_shape(optimizer.init, params)`).
    params_logical: the logical PartitionSpec tree of the parameters.

  Returns:
    A tree shaped like `opt_state` with PartitionSpecs; counters and other non-parameter leaves
    get `P()` (replicated).
  """
  import optax  # pylint: disable=g-import-not-at-top
  return optax.tree_map_params(optimizer, lambda _, spec: spec, opt_state, params_logical,
                               transform_non_params=lambda _: P(), is_leaf=_is_logical_leaf)


# ----------------------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """The sharding of a batch: the leading [B] axis split over the mesh axes of 'batch'.

  Under `DEFAULT_RULES` that is ('data', 'fsdp'); the other axes are replicated, so B must be a
  multiple of data * fsdp.
  """
  axes = _rules_table(rules, mesh).get("batch", ())
  return NamedSharding(mesh, P(axes if axes else None))


def global_batch(local_batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Global batch-sharded arrays from this process's rows of the batch.

  Args:
    local_batch: a pytree of host arrays `[B_local, ...]`; each process passes its own slice of
      the global batch (B_local = B / process_count; on one host, the whole batch).
    mesh: the device mesh.
    rules: see `DEFAULT_RULES`.

  Returns:
    The same pytree of global `[B, ...]` `jax.Array`s with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


# ----------------------------------------------------------------------------------------------
# Processes.

# Set ASD_JAX_DISTRIBUTED=1 to force `jax.distributed.initialize()` (e.g. on GCE TPU VM pods,
# where the worker list is only in the metadata server; launch/tpu_pod.sh sets it), =0 to skip it.
FORCE_ENV = "ASD_JAX_DISTRIBUTED"


def _count(var: str) -> int:
  try:
    return int(os.environ.get(var, "1"))
  except ValueError:
    return 1


def _hosts(var: str) -> int:
  return len([h for h in os.environ.get(var, "").split(",") if h.strip()])


def detect_multiprocess() -> str | None:
  """The multi-process environment this process runs in, or None on a single host.

  Returns one of 'forced', 'coordinator' (JAX_COORDINATOR_ADDRESS), 'slurm' (srun with more than
  one task), 'openmpi' (mpirun with more than one rank), 'tpu' (several TPU workers or slices),
  or None.
  """
  forced = os.environ.get(FORCE_ENV, "").strip().lower()
  if forced in ("0", "false", "no"):
    return None
  if forced in ("1", "true", "yes"):
    return "forced"
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "coordinator"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in os.environ for v in slurm) and _count("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in os.environ and _count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if (max(_hosts("TPU_PROCESS_ADDRESSES"), _hosts("TPU_WORKER_HOSTNAMES")) > 1
      or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")):
    return "tpu"
  return None


def initialize_distributed(**kwargs) -> bool:
  """Calls `jax.distributed.initialize(**kwargs)` when running as one of several processes.

  Call it before anything touches a device. JAX then reads the coordinator, the process count
  and id from the environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
  SLURM's srun variables with one process per GPU, Open MPI, Cloud TPU metadata). On one host
  (nothing detected, see `detect_multiprocess`) it does nothing.

  Returns:
    True when this call initialised the distributed runtime.
  """
  if jax.distributed.is_initialized():
    return False
  env = detect_multiprocess()
  if env is None:
    return False
  if env == "coordinator":
    # JAX reads only the address from the environment; the rest may come as variables too.
    for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
      if key not in kwargs and os.environ.get(var):
        kwargs[key] = int(os.environ[var])
  _log.info("multi-process environment detected (%s): jax.distributed.initialize()", env)
  jax.distributed.initialize(**kwargs)
  _log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes metrics, logs and checkpoint metadata."""
  return jax.process_index() == 0
