"""Training metrics: JSON lines, TensorBoard (when installed), a progress bar; a non-finite guard.

`MetricsWriter` writes from process 0 only (the others get a silent writer):

  <workdir>/metrics.jsonl   one JSON object a line: {"step": 120, "time": 1718000000.5, "loss": 0.31,
                            "gen/grad_norm": 1.7, ...}; nested metric dicts are flattened with '/'.
  <workdir>/tensorboard/    scalars, if tensorboardX, torch.utils.tensorboard or tensorflow imports.

Every metric is converted to a Python float. Non-finite values are kept, never zeroed: they are
written as the strings "nan", "inf" and "-inf" (JSON has no NaN/Infinity; `float(s)` reads them
back, and `read_jsonl` does it for a whole file).

`NonFiniteGuard` counts the updates that the train step skipped because a loss or gradient was
not finite, and stops the run with the metrics of the offending steps after too many in a row.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

__all__ = ["MetricsWriter", "NonFiniteGuard", "NonFiniteError", "flatten_metrics",
           "scalar_metrics", "read_jsonl"]

_log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "time")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'gen': {'loss': x}} -> {'gen/loss': x}."""
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_metrics(value, name + "/"))
    else:
      out[name] = value
  return out


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Flattened metrics as Python floats (one device-to-host transfer for all of them).

  Leaves with more than one element (and non-numeric ones) are left out.
  """
  flat = flatten_metrics(metrics)
  host = jax.device_get(flat)
  out = {}
  for name in flat:  # device_get sorts dict keys; keep the caller's order
    value = host[name]
    try:
      arr = np.asarray(value)
      if arr.size == 1 and (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        out[name] = float(arr.reshape(()))
    except (TypeError, ValueError):
      pass
  return out


def _json_value(x: float) -> float | str:
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return x


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl, with "nan"/"inf"/"-inf" turned back into floats.

  A truncated last line (a process killed while writing) is skipped.
  """
  records = []
  for line in Path(path).read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    records.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in record.items()})
  return records


# ----------------------------------------------------------------------------------------------
# TensorBoard back ends, tried in this order.


class _TorchLikeWriter:
  """tensorboardX or torch.utils.tensorboard."""

  def __init__(self, cls, logdir: str, purge_step: int | None):
    self._w = cls(logdir, purge_step=purge_step)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    for name, value in values.items():
      self._w.add_scalar(name, value, global_step=step)

  def close(self) -> None:
    self._w.flush()
    self._w.close()


class _TensorFlowWriter:

  def __init__(self, tf, logdir: str):
    self._tf = tf
    self._w = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    with self._w.as_default():
      for name, value in values.items():
        self._tf.summary.scalar(name, value, step=step)

  def close(self) -> None:
    self._w.flush()
    self._w.close()


def _importable(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def _open_tensorboard(logdir: str, purge_step: int | None):
  # find_spec first: a failed `import torch.utils.tensorboard` costs a whole torch import.
  if _importable("tensorboardX"):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return _TorchLikeWriter(tensorboardX.SummaryWriter, logdir, purge_step)
  if _importable("tensorboard") and _importable("torch"):
    from torch.utils import tensorboard  # pylint: disable=g-import-not-at-top
    return _TorchLikeWriter(tensorboard.SummaryWriter, logdir, purge_step)
  if _importable("tensorflow"):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return _TensorFlowWriter(tf, logdir)
  return None


# ----------------------------------------------------------------------------------------------


class MetricsWriter:
  """JSON lines + TensorBoard + a tqdm bar, on the main process only; see the module docstring.

  Usage:
    with MetricsWriter(workdir, total_steps=3000, start_step=step) as writer:
      for step in ...:
        writer.write(step, metrics)   # metrics: (nested) dict of scalars, jax or numpy or Python
  """

  def __init__(self, workdir: str | os.PathLike, *, is_main: bool | None = None,
               total_steps: int | None = None, start_step: int = 0,
               progress_keys: Sequence[str] | None = None, tensorboard: bool = True,
               progress: bool = True, filename: str = JSONL_NAME):
    """Opens the writers.

    Args:
      workdir: the run's directory (created if needed).
      is_main: whether this process writes; default `jax.process_index() == 0`.
      total_steps: the progress bar's length (None: open-ended).
      start_step: the first step this run will write. A resumed run passes the step it resumes
        from: records at or after it in an existing metrics.jsonl (written after the checkpoint,
        before the preemption) are dropped, and TensorBoard purges them too.
      progress_keys: metrics shown on the bar (default: the first four of the first write).
      tensorboard: write TensorBoard scalars when a back end is importable.
      progress: show the tqdm bar.
      filename: the JSON lines file's name inside `workdir`.
    """
    self.is_main = jax.process_index() == 0 if is_main is None else bool(is_main)
    self.workdir = Path(workdir)
    self.path = self.workdir / filename
    self._progress_keys = tuple(progress_keys) if progress_keys is not None else None
    self._start_time = time.time()
    self._last_step = start_step
    self._file = None
    self._tb = None
    self._bar = None
    if not self.is_main:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      self._drop_from(start_step)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      self._tb = _open_tensorboard(str(self.workdir / TENSORBOARD_DIR), start_step or None)
      if self._tb is None:
        _log.info("no TensorBoard writer installed (tensorboardX, torch or tensorflow); "
                  "metrics go to %s only.", self.path)
    if progress:
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

  def _drop_from(self, start_step: int) -> None:
    """Rewrites metrics.jsonl without the records at or after `start_step`."""
    kept, dropped = [], 0
    for line in self.path.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1  # a line cut short by a killed process
        continue
      if record.get("step", -1) < start_step:
        kept.append(line)
      else:
        dropped += 1
    if dropped:
      tmp = self.path.with_suffix(".tmp")
      tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
      os.replace(tmp, self.path)
      _log.info("dropped %d records at or after step %d from %s", dropped, start_step, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """Writes one step's metrics.

    Args:
      step: the step number (an int).
      metrics: a (nested) dict of scalars: jax arrays, numpy or Python numbers. Leaves with more
        than one element are skipped.

    Returns:
      The record written to metrics.jsonl (None on other processes).
    """
    if not self.is_main:
      return None
    step = int(step)
    values = scalar_metrics(metrics)
    clash = [k for k in values if k in _RESERVED]
    if clash:
      raise ValueError(f"metric names {clash} are reserved for the record's own fields.")
    record = {"step": step, "time": round(time.time(), 3)}
    record.update({k: _json_value(v) for k, v in values.items()})
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.scalars(step, values)
    if self._bar is not None:
      keys = self._progress_keys
      if keys is None:
        keys = self._progress_keys = tuple(values)[:4]
      self._bar.set_postfix({k: f"{values[k]:.4g}" for k in keys if k in values}, refresh=False)
      self.advance(step)
    return record

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step` without writing metrics."""
    if self._bar is not None and step > self._last_step:
      self._bar.update(step - self._last_step)
      self._last_step = step

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------------------------


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps with non-finite losses or gradients."""


class NonFiniteGuard:
  """Counts skipped (non-finite) updates; raises after `max_consecutive` in a row.

  The train step itself leaves the state unchanged when its loss or gradients are not finite;
  the guard watches the metrics on the host:

    guard = NonFiniteGuard(max_consecutive=20)
    guard.update(step, metrics)                          # finiteness from the metrics
    guard.update(step, metrics, finite=bool(ok))         # or from the step's own flag

  Attributes:
    num_skipped: non-finite steps so far (store it in the checkpoint metadata; `load_state`).
    consecutive: the current run of non-finite steps.
  """

  def __init__(self, max_consecutive: int, *, keys: Iterable[str] | None = None):
    """Args: max_consecutive (>= 1); keys: the metrics to check (default all scalars)."""
    if max_consecutive < 1:
      raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}.")
    self.max_consecutive = int(max_consecutive)
    self.keys = tuple(keys) if keys is not None else None
    self.num_skipped = 0
    self.consecutive = 0
    self._recent: collections.deque[tuple[int, dict[str, float]]] = collections.deque(
        maxlen=self.max_consecutive)

  def update(self, step: int, metrics: Mapping[str, Any], finite: bool | None = None) -> bool:
    """Records one step; returns whether it was finite.

    Args:
      step: the step number.
      metrics: that step's (nested) scalar metrics.
      finite: the step's own verdict (e.g. "all gradients finite"); default: every checked
        metric is finite.

    Raises:
      NonFiniteError: on the `max_consecutive`-th non-finite step in a row, listing the metrics
        of those steps.
    """
    values = scalar_metrics(metrics)
    if finite is None:
      checked = values if self.keys is None else {k: values[k] for k in self.keys if k in values}
      finite = all(math.isfinite(v) for v in checked.values())
    self._recent.append((int(step), values))
    if finite:
      self.consecutive = 0
      return True
    self.num_skipped += 1
    self.consecutive += 1
    if self.consecutive >= self.max_consecutive:
      lines = [f"  step {s}: " + ", ".join(f"{k}={v:.6g}" for k, v in m.items())
               for s, m in list(self._recent)[-self.consecutive:]]
      raise NonFiniteError(
          f"{self.consecutive} consecutive steps had non-finite losses or gradients (updates "
          f"skipped; {self.num_skipped} skipped in all). Their metrics:\n" + "\n".join(lines) +
          "\nLower the learning rate, check the data and the loss scales, or resume from an "
          "earlier checkpoint.")
    return False

  def state(self) -> dict[str, int]:
    """The counters, JSON-able, for the checkpoint metadata."""
    return {"num_skipped": self.num_skipped, "consecutive": self.consecutive}

  def load_state(self, state: Mapping[str, Any]) -> None:
    """Restores the counters saved by `state()`."""
    self.num_skipped = int(state.get("num_skipped", 0))
    self.consecutive = int(state.get("consecutive", 0))
