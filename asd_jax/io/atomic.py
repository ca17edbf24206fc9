"""Writes that appear whole or not at all, and the checks done on a destination before a long write.

Every output goes to a temporary sibling of its destination (same folder, so the final rename never
crosses a file system) named `NAME.tmp-PID-HOST-XXXXXXXX`, and becomes NAME by one rename once it
is complete; an existing NAME is moved aside first and deleted only after the swap. A failure
(including Ctrl-C) removes the temporary; a killed process leaves it, and the next write of the same
destination deletes it when the process that made it is gone (same host) or names it otherwise.

Before a long write the CLIs check that the destination does not overlap the source
(`check_disjoint`) and that the disk holds the output (`check_free_space`, with the figure).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

TMP_MARK = ".tmp-"


class DestinationError(ValueError):
  """A destination that cannot be written: overlaps the source, too little space, not writable."""


def fmt_bytes(n: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.1f} {unit}"
  return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------
# Temporary siblings and leftovers of killed runs.


def _host() -> str:
  return socket.gethostname().replace("-", "_") or "host"


def _tmp_prefix(dst: Path) -> str:
  return f"{dst.name}{TMP_MARK}{os.getpid()}-{_host()}-"


def _owner(tmp: Path, dst: Path) -> tuple[int, str] | None:
  """(pid, host) encoded in a temporary sibling's name, None for names of another format."""
  rest = tmp.name[len(dst.name) + len(TMP_MARK):]
  parts = rest.split("-")
  if len(parts) != 3 or not parts[0].isdigit():
    return None
  return int(parts[0]), parts[1]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def leftovers(dst: str | os.PathLike) -> list[Path]:
  """Temporary siblings of `dst` (`NAME.tmp-*`) left by earlier writes, oldest format included."""
  dst = Path(dst).absolute()
  if not dst.parent.is_dir():
    return []
  return sorted(p for p in dst.parent.iterdir() if p.name.startswith(dst.name + TMP_MARK))


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def clean_leftovers(dst: str | os.PathLike, log: Callable[[str], None] | None = _stderr
                    ) -> tuple[list[Path], list[Path]]:
  """Deletes the temporary siblings of `dst` whose writer is dead; names the others.

  A leftover made on this host by a process that no longer runs is deleted; one of a live process
  (a concurrent write), of another host (a shared file system) or of an unknown format is kept
  and named (`log`, stderr by default) so that a person can delete it.

  Returns:
    (deleted, kept).
  """
  dst = Path(dst).absolute()
  deleted, kept = [], []
  for tmp in leftovers(dst):
    owner = _owner(tmp, dst)
    if owner is not None and owner[1] == _host() and not _alive(owner[0]):
      if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        tmp.unlink(missing_ok=True)
      deleted.append(tmp)
    else:
      kept.append(tmp)
  if log is not None:
    if deleted:
      log(f"removed {len(deleted)} leftover(s) of killed runs: "
          f"{', '.join(str(p) for p in deleted)}")
    if kept:
      log(f"note: temporary outputs of other writes of {dst.name} (running, from another host, "
          f"or older); delete them if none is running: {', '.join(str(p) for p in kept)}")
  return deleted, kept


def make_parents(path: Path) -> list[Path]:
  """Creates the missing folders of `path` (itself included); returns them deepest first."""
  made = []
  p = Path(path)
  while not p.exists():
    made.append(p)
    p = p.parent
  for d in reversed(made):
    d.mkdir()
  return made


def remove_empty(dirs: list[Path]) -> None:
  """Removes the folders `make_parents` created (deepest first) while they are empty."""
  for d in dirs:
    try:
      d.rmdir()
    except OSError:
      break


def replace(tmp: Path, dst: Path) -> None:
  """Moves tmp to dst; an existing dst is moved aside first and deleted only after the swap."""
  if dst.exists() or dst.is_symlink():
    old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    try:
      os.rename(tmp, dst)
    except BaseException:
      os.rename(old, dst)
      raise
    if old.is_dir() and not old.is_symlink():
      shutil.rmtree(old)
    else:
      old.unlink()
  else:
    os.rename(tmp, dst)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary sibling directory of `dst` that becomes `dst` when the block succeeds.

  On any failure (including Ctrl-C) the temporary directory, and parents this created, are
  removed and `dst` is left as it was. Leftovers of killed earlier writes are cleaned first.
  """
  dst = Path(dst).absolute()
  made = make_parents(dst.parent)
  clean_leftovers(dst)
  tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dst), dir=dst.parent))
  try:
    yield tmp
    replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    remove_empty(made)
    raise


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary sibling file name that replaces `dst` when the block succeeds.

  `suffix` ends the temporary name (e.g. '.mp4' for a writer that picks the format by it). The
  block must leave a file there; on failure it is removed and `dst` is left as it was.
  """
  dst = Path(dst).absolute()
  made = make_parents(dst.parent)
  clean_leftovers(dst)
  fd, name = tempfile.mkstemp(prefix=_tmp_prefix(dst), suffix=suffix, dir=dst.parent)
  os.close(fd)
  tmp = Path(name)
  try:
    yield tmp
    replace(tmp, dst)
  except BaseException:
    tmp.unlink(missing_ok=True)
    remove_empty(made)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Writes `data` to `path` atomically (flushed to disk before the rename)."""
  path = Path(path)
  with atomic_file(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  return path


def write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes UTF-8 `text` to `path` atomically."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
  """Writes `obj` as JSON (a trailing newline) to `path` atomically."""
  dumps_kwargs.setdefault("indent", 2)
  return write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def save_npy(path: str | os.PathLike, array: Any) -> Path:
  """`np.save` to `path` atomically."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = Path(path)
  with atomic_file(path, suffix=".npy") as tmp:
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(array))
      f.flush()
      os.fsync(f.fileno())
  return path


# ----------------------------------------------------------------------------------------------
# Checks before work starts.


def existing_ancestor(path: str | os.PathLike) -> Path:
  """`path` or its nearest ancestor that exists (where its folders would be created)."""
  p = Path(path).expanduser().absolute()
  while not p.exists() and p != p.parent:
    p = p.parent
  return p


def free_bytes(path: str | os.PathLike) -> int:
  """Free bytes (for this user) on the file system `path` would be written to."""
  return shutil.disk_usage(existing_ancestor(path)).free


def check_free_space(path: str | os.PathLike, need: int, what: str, flag: str = "--dst") -> None:
  """Refuses to start a write of about `need` bytes at `path` when the disk has less free.

  Raises:
    DestinationError saying how much is needed and how much is free.
  """
  free = free_bytes(path)
  if need > free:
    raise DestinationError(
        f"not enough free disk for {what}: it needs about {fmt_bytes(need)} at {flag} "
        f"{existing_ancestor(path)}, which has {fmt_bytes(free)} free; free some space or "
        f"choose another {flag}.")


def check_disjoint(src: str | os.PathLike, dst: str | os.PathLike, src_flag: str = "--src",
                   dst_flag: str = "--dst") -> None:
  """Refuses a destination equal to, inside, or containing the source (it would be replaced).

  Raises:
    DestinationError naming both paths.
  """
  s = Path(src).expanduser().resolve()
  d = Path(dst).expanduser().resolve()
  if s == d:
    why = "is the same as"
  elif s in d.parents:
    why = "is inside"
  elif d in s.parents:
    why = "contains"
  else:
    return
  raise DestinationError(f"{dst_flag} {d} {why} {src_flag} {s}: writing there would replace or "
                         f"mix with the source; choose a {dst_flag} apart from {src_flag}.")


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
  """Checks, creating nothing, that `path` is (or can be made as) a writable directory.

  Raises:
    DestinationError: `path` (or an ancestor) is a file, or the folder is not writable.
  """
  p = Path(path).expanduser().absolute()
  base = existing_ancestor(p)
  if not base.is_dir():
    what = "is a file" if base == p else f"cannot be created: {base} is a file"
    raise DestinationError(f"{flag} {p} {what}; give a directory.")
  if not os.access(base, os.W_OK | os.X_OK):
    raise DestinationError(f"{flag} {p}: {base} is not writable (read-only file system or no "
                           f"permission); choose another {flag}.")
  return p


def describe_os_error(e: OSError) -> str:
  """One line for an OSError a person can act on (full disk, read-only, no permission)."""
  where = f" ({e.filename})" if e.filename else ""
  hints = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
  if e.errno in hints:
    return f"{hints[e.errno]}{where}: free some space or choose a writable location."
  return f"{e.strerror or e}{where}"
