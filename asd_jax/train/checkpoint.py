"""Training checkpoints: periodic asynchronous saves, resume, and a clean exit on preemption.

A checkpoint is one step directory holding the state pytree (any arrays, sharded or not, typed
PRNG keys included) and a small JSON metadata dict (the config, counters):

  ckpt = Checkpointer(workdir + "/checkpoints", save_interval_steps=1000, max_to_keep=3)
  state, meta, step = ckpt.restore_or_init(init_fn)          # resume if a checkpoint exists
  for step in range(step or 0, total_steps):
    state, metrics = train_step(state, batch, step)
    ckpt.save(step + 1, state, {"config": config.to_dict()})  # every K steps, or on preemption
    if ckpt.should_stop():                                     # SIGTERM: saved, now exit cleanly
      break
  ckpt.close()

Step numbers count completed updates: `save(n, ...)` stores the state after n updates and a resumed
run continues with update n.

Atomicity: Orbax writes each step into a temporary directory and renames it (or, on object stores,
writes a commit marker) only once every host has finished, so a save killed half-way leaves the
previous checkpoints untouched and is never picked as the latest; leftover temporary directories
are removed when a Checkpointer opens the directory. Arrays are written by every process (each
its own shards); the JSON metadata by process 0 only.

Damage: `restore_latest` tries the newest checkpoint first; one that cannot be read (a truncated
or missing file) is reported in one line (the file and the cause), moved aside to
`DIR.damaged/STEP-TIME`, and the previous one is tried, so a run resumes from the newest good
checkpoint. A checkpoint that reads but does not fit the state (another config) is an error.

Preemption: on one process a SIGTERM handler sets a flag; the next `save` call (the next step
boundary) writes a checkpoint whatever the step, waits for it, and `should_stop()` turns True. With
several processes JAX's own preemption service receives the SIGTERM and picks a step that every
process reaches (`multihost_utils.reached_preemption_sync_point`), so all hosts save the same step;
this only needs `save` to be called at every step on every process, which the loop above does.
`preempted()` tells the entry point that a run stopped for a preemption notice (it then exits with
`asd_jax.cli.EXIT_PREEMPTED`, 75, so that launch scripts run it again).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from asd_jax.io import orbax_io

__all__ = ["Checkpointer"]

_log = logging.getLogger(__name__)

STATE = "state"
METADATA = "metadata"
DAMAGED_SUFFIX = ".damaged"
# The barrier Orbax (0.12) ends every restore with (`Checkpointer.restore`'s
# sync_global_processes); a process whose read failed joins it before falling back.
_ORBAX_RESTORE_BARRIER = "Checkpointer:restore"

_PREEMPTED = threading.Event()  # set once any Checkpointer stopped a run for a preemption


def preempted() -> bool:
  """Whether a Checkpointer of this process wrote a preemption checkpoint and asked to stop."""
  return _PREEMPTED.is_set()


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending, without opening a manager
  (nothing is created; none when the directory does not exist)."""
  directory = orbax_io.as_path(directory)
  if not directory.exists():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def start_status(directory: str | os.PathLike, total_steps: int, *, export: bool = True) -> str:
  """What a run over `directory` will do, for its first line: start fresh, resume from step N, or
  nothing left to do (a damaged newest checkpoint is reported, and skipped, when restoring)."""
  steps = complete_steps(directory)
  where = orbax_io.as_path(directory).parent
  if not steps:
    return f"starting fresh in {where} ({total_steps} steps)"
  if steps[-1] >= total_steps:
    return (f"nothing left to do in {where}: checkpoint {steps[-1]} reached total_steps "
            f"{total_steps}" + ("; writing the export" if export else ""))
  return f"resuming {where} from step {steps[-1]} of {total_steps} (checkpoints: {steps})"


class DamagedCheckpointError(orbax_io.DamagedCheckpointError):
  """A training checkpoint cannot be read (a file is missing, truncated or corrupt)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(x).tolist()
  if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
    return x.to_dict()
  if isinstance(x, (set, frozenset)):
    return sorted(x)
  raise TypeError(f"checkpoint metadata holds a {type(x).__name__} ({x!r}), which is not "
                  f"JSON-serialisable; store plain numbers, strings, lists and dicts.")


def _jsonable(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
  """A JSON round trip, done before an asynchronous save so errors surface here."""
  if metadata is None:
    return {}
  if hasattr(metadata, "to_dict"):
    metadata = metadata.to_dict()
  if not isinstance(metadata, Mapping):
    raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}.")
  # NaN/inf stay valid in Python's json (written as NaN/Infinity).
  return json.loads(json.dumps(dict(metadata), default=_json_default))


def _default_sharding() -> jax.sharding.Sharding:
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_leaf(x: Any) -> Any:
  """A ShapeDtypeStruct with a sharding for a restore target leaf."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct):
    if x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())
    return x
  return x  # numpy arrays come back as numpy arrays, Python scalars as saved.


def _nbytes(x: Any) -> int:
  """Bytes a leaf takes in a checkpoint (typed PRNG keys as their key data)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    return 0
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _damage(e: BaseException) -> str | None:
  """'FILE: cause' when a restore failed on an unreadable file (truncated, corrupt, missing)."""
  seen = set()
  x = e
  while x is not None and id(x) not in seen:
    seen.add(id(x))
    if isinstance(x, FileNotFoundError):
      return f"{x.filename or x}: missing"
    x = x.__cause__ or x.__context__
  cause = orbax_io.read_failure(e)
  return cause if orbax_io._READ_ERROR.search(_chain_text(e)) else None  # pylint: disable=protected-access


def _chain_text(e: BaseException) -> str:
  seen, parts = set(), []
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    parts.append(str(e))
    e = e.__cause__ or e.__context__
  return "\n".join(parts)


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A key path as names, the same for dict keys, attributes and sequence indices."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


class Checkpointer:
  """Saves and restores a training state pytree plus JSON metadata; see the module docstring.

  Attributes:
    directory: where the step directories live (local path or e.g. gs://bucket/run/checkpoints).
    save_interval_steps: `save(step, ...)` writes when `step % save_interval_steps == 0`.
  """

  def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1000,
               max_to_keep: int | None = 3, keep_period: int | None = None,
               async_save: bool = True, handle_sigterm: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: the checkpoint directory (one subdirectory per saved step).
      save_interval_steps: save every this many steps (> 0).
      max_to_keep: keep the newest this many checkpoints (None: all).
      keep_period: also keep, forever, every checkpoint whose step is a multiple of this.
      async_save: write in a background thread; `save` returns once the arrays are copied to
        host memory (so the caller may donate or overwrite the device buffers right away).
      handle_sigterm: on a single process, install a SIGTERM handler that requests a save at
        the next step boundary followed by `should_stop() == True` (restored by `close`).
    """
    if save_interval_steps <= 0:
      raise ValueError(f"save_interval_steps (checkpoint.every of a training config) must be "
                       f">= 1, got {save_interval_steps}.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep (checkpoint.keep of a training config) must be >= 1 (or None "
                       f"for all), got {max_to_keep}: with none kept a run could never resume.")
    self.directory = orbax_io.as_path(directory)
    self.save_interval_steps = int(save_interval_steps)
    self._async = bool(async_save)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=self._async,
        save_interval_steps=1)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})
    self._stop_requested = False  # a preemption notice arrived (set by the signal handler)
    self._stopping = False  # the preemption checkpoint is written: exit now
    self._multiprocess = jax.process_count() > 1
    self._sync_point: tuple[int | None, bool] = (None, False)  # (step, reached) last asked
    self._handler_installed = False
    self._previous_handler: Any = None
    if handle_sigterm and not self._multiprocess:
      if threading.current_thread() is threading.main_thread():
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._handler_installed = True
      else:
        _log.warning("Checkpointer created outside the main thread: no SIGTERM handler.")

  # ---------------------------------------------------------------------------------------------
  # Preemption.

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    # Only set a flag: the save happens at the next step boundary, in the training thread.
    self._stop_requested = True

  def request_stop(self) -> None:
    """Asks for a checkpoint at the next `save` call and then `should_stop()`, as SIGTERM does.

    With several processes, call it on every process before the same step's `save`.
    """
    self._stop_requested = True

  def _preemption_reached(self, step: int) -> bool:
    if self._stop_requested:
      return True
    if self._multiprocess:
      if self._sync_point[0] != step:  # ask once a step (should_save and save both ask)
        try:
          from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
          reached = bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # the preemption service is disabled
          reached = False
        self._sync_point = (step, reached)
      return self._sync_point[1]
    return False

  def should_stop(self) -> bool:
    """True once a preemption checkpoint has been written: leave the training loop now."""
    return self._stopping

  # ---------------------------------------------------------------------------------------------
  # Saving.

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` would write (interval reached or preemption requested).

    With several processes this also takes part in the preemption sync protocol, so call it (or
    `save`) at every step on every process, or not at all.
    """
    return step % self.save_interval_steps == 0 or self._preemption_reached(step)

  def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves `state` as step `step` when due; call it after every training step.

    Args:
      step: the number of completed updates (>= 0).
      state: a pytree of arrays (jax, possibly sharded, or numpy), typed PRNG keys and scalars.
      metadata: a small JSON-able dict (config, counters); ConfigDicts and numpy scalars are
        converted. Written by process 0.
      force: save even if `step` is not a multiple of `save_interval_steps` (e.g. the last step).

    Returns:
      True if a checkpoint of `step` was started (or, for a preemption, written).
    """
    step = int(step)
    preempted = self._preemption_reached(step)
    if not (force or preempted or step % self.save_interval_steps == 0):
      return False
    saved = False
    if step not in self._manager.all_steps():
      self.check_space(state, f"checkpoint {step}")
    if step in self._manager.all_steps():
      _log.info("checkpoint %d already exists in %s; not saving it again.", step, self.directory)
    else:
      args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                   METADATA: ocp.args.JsonSave(_jsonable(metadata))})
      saved = self._manager.save(step, args=args, force=True)
    if preempted:
      _log.warning("preemption requested: checkpoint %d written to %s; stopping.", step,
                   self.directory)
      self._manager.wait_until_finished()
      self._stop_requested = False  # later calls save on the usual interval only
      self._stopping = True
      _PREEMPTED.set()
    elif not self._async:
      self._manager.wait_until_finished()
    return saved

  def wait_until_finished(self) -> None:
    """Blocks until the asynchronous save in flight (if any) is committed."""
    self._manager.wait_until_finished()

  # ---------------------------------------------------------------------------------------------
  # Restoring.

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint straight into the given shardings.

    Args:
      abstract_state: the state's structure, as `jax.ShapeDtypeStruct`s with `.sharding` (e.g.
        `sharding.abstract_sharded(...)` or `jax.eval_shape` of a jitted init with
        out_shardings) or as jax arrays whose shardings are taken. Each process reads only its
        shards; ShapeDtypeStructs without a sharding land on the first local device (one
        process) or replicated (several). numpy leaves come back as numpy arrays. Each leaf is
        cast to the requested dtype; shapes and the tree structure must match the checkpoint.
      step: which checkpoint (default: the latest).

    Returns:
      (state, metadata): the state pytree shaped like `abstract_state`, and the JSON metadata.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; available: "
                              f"{self.all_steps()}.")
    target = jax.tree.map(_abstract_leaf, abstract_state)
    where = f"checkpoint {step} in {self.directory}"
    self._check_shapes(step, target)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                 METADATA: ocp.args.JsonRestore()})
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except  (Orbax/tensorstore raise assorted types)
      damaged = _damage(e)
      if damaged is None and not isinstance(e, (ValueError, KeyError, TypeError)):
        raise
      message = (f"{where} is damaged: {damaged}" if damaged else
                 f"{where} does not fit the given abstract state (different structure, shapes or "
                 f"dtypes?): {orbax_io.read_failure(e)}")
    else:
      return restored[STATE], dict(restored[METADATA] or {})
    orbax_io._drop_failed_reads()  # pylint: disable=protected-access
    if damaged and self._multiprocess:
      # The processes whose shards read are waiting in Orbax's closing barrier of the restore;
      # join it, so that `restore_latest` can then agree with them on falling back.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(_ORBAX_RESTORE_BARRIER)
    raise (DamagedCheckpointError(message, step) if damaged else ValueError(message))

  def check_space(self, state: Any, what: str = "a checkpoint") -> int:
    """Raises OSError (ENOSPC, with the figures) when the disk cannot hold a checkpoint of
    `state` (arrays or ShapeDtypeStructs), before anything is written; returns the bytes needed.

    Without this an asynchronous save onto a full disk fails in Orbax's writer threads, each
    logging its own traceback. Object stores (gs://...) are not checked."""
    need = sum(_nbytes(x) for x in jax.tree.leaves(state))
    if "://" in str(self.directory):
      return need
    from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
    try:
      atomic.check_free_space(self.directory, need, what, "--workdir")
    except atomic.DestinationError as e:
      raise OSError(errno.ENOSPC, str(e)) from None
    return need

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest checkpoint that can be read; None when there is none.

    First checks that the disk can hold a checkpoint of the state (`check_space`), so that a
    run meant to fail on a full disk fails before it computes anything.

    A damaged checkpoint (see `restore`) is reported in one line at WARNING, moved aside to
    `DIRECTORY.damaged/STEP-TIME` (so later saves of that step are not skipped and the next run does
    not meet it again) and the previous one is tried. A checkpoint that does not fit the state
    raises ValueError, as `restore` does; when every checkpoint is damaged the last
    DamagedCheckpointError is raised.

    Returns:
      (state, metadata, step) or None.
    """
    self.check_space(abstract_state)
    error = None
    for step in sorted(self.all_steps(), reverse=True):
      failure = None
      try:
        state, metadata = self.restore(abstract_state, step)
      except DamagedCheckpointError as e:
        failure = e
      if self._multiprocess:  # each process reads its own shards: fall back together
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        bad = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None)))
        if bad.any() and failure is None:
          failure = DamagedCheckpointError(
              f"checkpoint {step} in {self.directory} is damaged (processes "
              f"{np.flatnonzero(bad).tolist()} could not read their shards; see their logs)", step)
      if failure is not None:
        error = failure
        older = [s for s in self.all_steps() if s < step]
        _log.warning("%s; %s", failure, f"falling back to checkpoint {older[-1]}" if older else
                     "no older checkpoint to fall back to")
        self._move_aside(step)
        continue
      if error is not None:
        _log.warning("resumed from checkpoint %d, the newest that could be read.", step)
      return state, metadata, step
    if error is not None:
      raise error
    return None

  def _move_aside(self, step: int) -> None:
    """Moves a damaged step directory to DIRECTORY.damaged/STEP-TIME (process 0; all wait)."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        aside = self.directory.parent / (self.directory.name + DAMAGED_SUFFIX)
        aside.mkdir(parents=True, exist_ok=True)
        dst = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
          src.rename(dst)
        except OSError:  # object stores cannot rename: delete
          if "://" in str(src):
            src.rmtree()
          else:
            shutil.rmtree(src, ignore_errors=True)
        _log.warning("moved the damaged checkpoint %d to %s", step, dst)
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"asd_jax_checkpoint_aside_{step}")
    self._manager.reload()

  def _check_shapes(self, step: int, target: Any) -> None:
    """Names the leaves whose stored shape differs from the requested one, before reading."""
    try:
      stored = self._manager.item_metadata(step)[STATE]
    except Exception:  # pylint: disable=broad-except
      return  # no metadata to compare with: Orbax checks while reading
    stored = {_path_key(p): tuple(getattr(m, "shape", ()) or ())
              for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    wrong = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      key = _path_key(path)
      if key not in stored or not hasattr(leaf, "shape"):
        continue  # structure differences are reported by Orbax
      shape = tuple(leaf.shape)
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # stored as key data
        shape = jax.eval_shape(jax.random.key_data, leaf).shape
      if shape != stored[key]:
        wrong.append(f"{'/'.join(key)}: stored {list(stored[key])}, requested {list(shape)}")
    if wrong:
      raise ValueError(f"checkpoint {step} in {self.directory} does not fit the given abstract "
                       f"state:\n  " + "\n  ".join(wrong[:20]) +
                       (f"\n  ... and {len(wrong) - 20} more" if len(wrong) > 20 else ""))

  def restore_or_init(self, init_fn: Callable[[], Any], abstract_state: Any = None
                      ) -> tuple[Any, dict[str, Any], int | None]:
    """Resumes from the latest checkpoint, or builds a fresh state when there is none.

    Args:
      init_fn: no-argument function building the (sharded) initial state, e.g. a
        `functools.partial(sharding.shard_init, ...)` or a jitted init with out_shardings.
      abstract_state: restore target (see `restore`); default `jax.eval_shape(init_fn)`, which
        carries the shardings when `init_fn` is jitted with out_shardings.

    Returns:
      (state, metadata, step): step is the restored step (updates already done), or None when
      `init_fn` was called (metadata is then {}).
    """
    if self.latest_step() is None:
      return init_fn(), {}, None
    if abstract_state is None:
      abstract_state = jax.eval_shape(init_fn)
    restored = self.restore_latest(abstract_state)
    if restored is None:
      return init_fn(), {}, None
    state, metadata, step = restored
    _log.info("resumed from checkpoint %d in %s", step, self.directory)
    return state, metadata, step

  # ---------------------------------------------------------------------------------------------

  def close(self) -> None:
    """Waits for saves in flight, releases Orbax's threads and restores the SIGTERM handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._handler_installed:
      # None: the previous handler was not installed from Python; fall back to the default.
      signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
      self._handler_installed = False

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
