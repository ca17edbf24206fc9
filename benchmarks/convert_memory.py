"""Peak memory of `python -m asd_jax.convert wan` (and `export-wan`) on a real-sized checkpoint.

1. Writes a random checkpoint with the real key list and shapes (original Wan names, float32 by
   default; the 1.3B file is ~5.7 GB), streaming, one tensor at a time.
2. Converts it in a child process and polls the child's /proc status every 20 ms.
3. Optionally (--export) writes it back with export-wan, measured the same way.
Prints one JSON object.

Figures reported per step:
- peak_rss: the kernel's high-water mark of the child's resident set (wait4 ru_maxrss), exact.
  It counts file-backed pages the child has mapped (the memory-mapped source tensors and the
  staging arrays Orbax reads from); the kernel drops those under memory pressure, so on a machine
  with less RAM than the checkpoint they are reclaimed instead of growing.
- peak_rss_anon: the largest anonymous resident memory seen by polling (RssAnon). This is what
  cannot be reclaimed and what must fit in RAM; for a streaming converter it should not grow with
  the checkpoint size.
- peak_rss_file: the largest file-backed resident memory seen (RssFile).

Usage:
  python benchmarks/convert_memory.py                               # 1.3B, float32
  python benchmarks/convert_memory.py --keys=14b --layers=14        # 14B-shaped, first 14 blocks
  python benchmarks/convert_memory.py --export --keep --workdir=/data/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asd_jax.io import safetensors as st  # pylint: disable=g-import-not-at-top,wrong-import-position

KEY_LISTS = {"1.3b": "wan21_t2v_1.3b_dit_keys.txt", "14b": "wan21_t2v_14b_dit_keys.txt"}


def read_key_list(which: str, layers: int | None) -> dict[str, tuple[int, ...]]:
  path = Path(which)
  if which in KEY_LISTS:
    path = REPO.parent / "shared" / "data" / "wan_keys" / KEY_LISTS[which]
  if not path.is_file():
    sys.exit(f"key list {path} not found (the shared/ folder lives next to the repository).")
  shapes = {}
  for line in path.read_text().splitlines():
    if line.strip():
      name, shape = line.split("\t")
      m = re.match(r"blocks\.(\d+)\.", name)
      if layers is not None and m and int(m.group(1)) >= layers:
        continue
      shapes[name] = tuple(json.loads(shape))
  return shapes


def write_random_checkpoint(path: Path, shapes: dict, dtype: np.dtype, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)

  def produce(name):
    # Small values like real weights (and the same magnitude for every tensor).
    return (rng.standard_normal(shapes[name], dtype=np.float32) * 0.02).astype(dtype)
  tmp = path.with_name(path.name + ".tmp")
  st.write_streaming(tmp, {n: (s, dtype) for n, s in shapes.items()}, produce)
  os.replace(tmp, path)


def _status_kb(pid: int) -> dict[str, int]:
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
          out[key] = int(rest.split()[0])
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


def run_measured(cmd: list[str], env: dict) -> dict:
  """Runs cmd, polling its memory; returns wall time and peaks in bytes."""
  peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  done = threading.Event()

  def poll():
    while not done.is_set():
      s = _status_kb(proc.pid)
      for k in peaks:
        peaks[k] = max(peaks[k], s.get(k, 0))
      time.sleep(0.02)
  thread = threading.Thread(target=poll, daemon=True)
  thread.start()
  output = proc.stdout.read().decode(errors="replace")
  _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (not all children's)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - start
  done.set()
  thread.join()
  if proc.returncode != 0:
    sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
  return {"command": " ".join(cmd), "wall_s": round(wall, 1),
          "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
          "peak_rss_anon_bytes": peaks["RssAnon"] * 1024,
          "peak_rss_file_bytes": peaks["RssFile"] * 1024,
          "peak_rss_polled_bytes": peaks["VmRSS"] * 1024}


def _du(path: Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--keys", default="1.3b", help="1.3b, 14b, or a key-list file (name<TAB>shape).")
  p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks.")
  p.add_argument("--src_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="--dtype of the conversion.")
  p.add_argument("--workdir", default="/tmp/asd_convert_memory")
  p.add_argument("--export", action="store_true", help="also measure export-wan.")
  p.add_argument("--keep", action="store_true", help="keep the files (the source is reused).")
  args = p.parse_args()

  import ml_dtypes  # pylint: disable=g-import-not-at-top
  src_dtype = np.dtype(np.float32 if args.src_dtype == "float32" else ml_dtypes.bfloat16)
  shapes = read_key_list(args.keys, args.layers)
  work = Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  tag = f"{Path(args.keys).name.replace('.txt', '')}_{args.layers or 'all'}_{args.src_dtype}"
  src = work / f"wan_{tag}.safetensors"
  n_params = sum(int(np.prod(s)) for s in shapes.values())
  expected_bytes = n_params * src_dtype.itemsize
  t0 = time.perf_counter()
  if not (src.is_file() and src.stat().st_size > expected_bytes):
    write_random_checkpoint(src, shapes, src_dtype)
  write_s = time.perf_counter() - t0
  size = src.stat().st_size

  dst = work / f"jax_{tag}"
  shutil.rmtree(dst, ignore_errors=True)
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  py = sys.executable
  conv = run_measured([py, "-m", "asd_jax.convert", "wan", f"--src={src}", f"--dst={dst}",
                       f"--dtype={args.dtype}", "--quiet"], env)
  conv["output_bytes"] = _du(dst)
  conv["peak_rss_over_checkpoint"] = round(conv["peak_rss_bytes"] / size, 3)
  conv["peak_rss_anon_over_checkpoint"] = round(conv["peak_rss_anon_bytes"] / size, 3)
  result = {
      "benchmark": "convert_memory",
      "keys": args.keys, "layers": args.layers or "all", "tensors": len(shapes),
      "params": n_params, "checkpoint_dtype": args.src_dtype, "checkpoint_bytes": size,
      "write_random_checkpoint_s": round(write_s, 1),
      "convert": conv,
  }
  if args.export:
    out = work / f"export_{tag}.safetensors"
    out.unlink(missing_ok=True)
    exp = run_measured([py, "-m", "asd_jax.convert", "export-wan", f"--src={dst}", f"--dst={out}",
                        "--quiet"], env)
    exp["output_bytes"] = _du(out)
    exp["peak_rss_over_checkpoint"] = round(exp["peak_rss_bytes"] / size, 3)
    exp["peak_rss_anon_over_checkpoint"] = round(exp["peak_rss_anon_bytes"] / size, 3)
    result["export"] = exp
    if args.dtype == args.src_dtype:
      # Spot check the round trip on a few tensors (the tests check it in full).
      a, b = st.SafetensorsFile(src), st.SafetensorsFile(out)
      names = a.keys()
      for name in names[:3] + names[-3:]:
        if not np.array_equal(a.read(name).view(np.uint8), b.read(name).view(np.uint8)):
          sys.exit(f"export differs from the source at {name}")
      result["export"]["round_trip_spot_check"] = "identical"
    if not args.keep:
      out.unlink()
  if not args.keep:
    shutil.rmtree(dst, ignore_errors=True)
    src.unlink()
  try:
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    mem_total = None
  result["machine"] = {"cpus": os.cpu_count(), "ram_bytes": mem_total,
                       "platform": platform.platform(), "python": platform.python_version()}
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
