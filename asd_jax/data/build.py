"""Prompts file -> TFDS prompt dataset of trimmed umT5 contexts (ArrayRecord, no TensorFlow).

    python -m asd_jax.data.build --prompts=prompts.txt --out=data/prompts \
        --umt5=ckpt/umt5 --tokenizer=ckpt/tokenizer [--negative_prompt=TEXT] [--batch_size=16]

The prompts file holds one prompt per line (UTF-8); blank lines are skipped, duplicates kept.
Every prompt is encoded once by umT5 and stored trimmed to its true length in bfloat16, with the
negative prompt (Wan's by default) stored once beside them; the layout is described in
`asd_jax.data.prompts`, which reads it back.

Size: a prompt of L tokens takes L * d_model * 2 bytes (8 KiB a token for umT5-XXL), so about
60 tokens on average over 250k prompts makes some 120 GB.

The build runs in a hidden sibling directory `.{out}.partial-XXXX` and becomes `out` by one rename
at the very end, after its completeness mark (`prompt_dataset.json`) is written. An interrupted
build thus leaves no `out` at all; an exception removes its partial directory, a killed process
leaves it behind (the next build names it so that it can be deleted).

From Python, with any encoder `encode(prompts) -> (context [N, text_len, d] float32 zero past each
length, lengths [N] int32)`:

    from asd_jax.data import build
    prompts = build.read_prompts("prompts.txt").prompts
    build.build_dataset(prompts, "data/prompts", encoder)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from asd_jax.data import prompts as prompts_lib

Encode = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]

DEFAULT_NAME = "prompts"
DEFAULT_SHARD_BYTES = 1 << 30
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


class BuildError(ValueError):
  """Bad inputs to a build (prompts file, output directory, encoder output)."""


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class PromptsFile:
  """The prompts of a text file: one per non-blank line, surrounding whitespace stripped."""
  path: Path
  prompts: list[str]
  num_lines: int
  num_blank: int

  @property
  def num_duplicates(self) -> int:
    """Prompts that repeat an earlier one (they are kept)."""
    return len(self.prompts) - len(set(self.prompts))

  def summary(self) -> str:
    return (f"{self.path}: {len(self.prompts)} prompts from {self.num_lines} lines "
            f"({self.num_blank} blank lines skipped, {self.num_duplicates} duplicates kept)")


def read_prompts(path: str | os.PathLike) -> PromptsFile:
  """Reads a UTF-8 prompts file (one prompt a line; blank lines skipped, duplicates kept).

  Raises:
    FileNotFoundError: no such file.
    BuildError: not UTF-8, or no prompt in it.
  """
  p = Path(path).expanduser()
  if not p.is_file():
    raise FileNotFoundError(f"prompts file {p} does not exist (give a UTF-8 text file with one "
                            f"prompt per line).")
  try:
    text = p.read_text(encoding="utf-8-sig")  # tolerates a byte-order mark
  except UnicodeDecodeError as e:
    line = p.read_bytes()[:e.start].count(b"\n") + 1
    raise BuildError(f"{p} is not UTF-8 (line {line}: {e.reason}); convert it, e.g. with "
                     f"`iconv -t UTF-8`.") from e
  # Lines end at \n, \r\n or \r only: str.splitlines would also split at characters that may
  # appear inside a prompt (\x0b, \x1c, \u2028, ...).
  lines = re.split(r"\r\n|\r|\n", text)
  if lines and lines[-1] == "":
    lines.pop()  # the final newline ends the last line; it does not start a new one
  prompts = [line.strip() for line in lines if line.strip()]
  if not prompts:
    raise BuildError(f"{p} holds no prompt ({len(lines)} lines, all blank); give a file with one "
                     f"prompt per line.")
  return PromptsFile(p, prompts, len(lines), len(lines) - len(prompts))


def _partial_prefix(out: Path) -> str:
  return f".{out.name}.partial-"


def check_out_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
  """Checks that `out` can receive a dataset (absent or an empty directory, or `overwrite`)."""
  path = Path(out).expanduser().absolute()
  if path.exists() or path.is_symlink():
    if not path.is_dir():
      raise BuildError(f"--out {path} exists and is not a directory; choose another path.")
    if any(path.iterdir()) and not overwrite:
      raise BuildError(f"--out {path} exists and is not empty; choose another directory, delete "
                       f"it, or pass --overwrite to replace it once the new build is complete.")
  if path.parent.exists() and not path.parent.is_dir():
    raise BuildError(f"the parent of --out, {path.parent}, is not a directory.")
  return path


def _new_sibling(out: Path, prefix: str) -> Path:
  """A new empty directory beside `out` (made with mkdir, so the umask applies: the finished
  dataset gets the permissions of any directory the user makes, unlike tempfile's 0700)."""
  while True:
    path = out.parent / f"{prefix}{secrets.token_hex(4)}"
    try:
      path.mkdir()
      return path
    except FileExistsError:
      continue


def _stale_partials(out: Path) -> list[Path]:
  if not out.parent.is_dir():
    return []
  return sorted(p for p in out.parent.iterdir() if p.name.startswith(_partial_prefix(out)))


# ----------------------------------------------------------------------------------------------
# Encoding


def _store_dtype(name: str) -> np.dtype:
  if name not in prompts_lib.STORE_DTYPES:
    raise BuildError(f"store dtype must be one of {prompts_lib.STORE_DTYPES}, got {name!r}.")
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def _encode_trimmed(encode: Encode, prompts: Sequence[str], text_len: int, d_model: int | None,
                    store: np.dtype) -> list[np.ndarray]:
  """Encodes prompts; returns each context trimmed to its length, [length_i, d_model] `store`.

  The encoder contract is checked (shapes, lengths, exact zeros past each length, finite values):
  trimming would otherwise drop data silently.
  """
  out = encode(list(prompts))
  if not isinstance(out, tuple) or len(out) != 2:
    raise BuildError(f"the encoder must return (context, lengths), got {type(out).__name__}.")
  context, lengths = np.asarray(out[0]), np.asarray(out[1])
  n = len(prompts)
  if context.ndim != 3 or context.shape[:2] != (n, text_len) or (
      d_model is not None and context.shape[2] != d_model):
    want = f"[{n}, {text_len}, {d_model if d_model is not None else 'd_model'}]"
    raise BuildError(f"the encoder returned a context of shape {context.shape}, expected {want} "
                     f"(is --text_len {text_len} the encoder's?).")
  if not np.issubdtype(context.dtype, np.floating):
    raise BuildError(f"the encoder returned a {context.dtype} context; expected float32.")
  if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
    raise BuildError(f"the encoder returned lengths {lengths.dtype} {lengths.shape}; expected "
                     f"int [{n}].")
  if n and (lengths.min() < 0 or lengths.max() > text_len):
    raise BuildError(f"the encoder returned lengths in [{lengths.min()}, {lengths.max()}]; they "
                     f"must lie in [0, {text_len}].")
  rows = np.arange(text_len)[None, :] < lengths[:, None]  # [N, text_len]
  if np.any(context[~rows]):
    bad = int(np.nonzero(np.any(context != 0, axis=2) & ~rows)[0][0])
    raise BuildError(f"the encoder's context of prompt {prompts[bad]!r} is not zero past its "
                     f"length {int(lengths[bad])}; the stored trimmed context would differ.")
  if not np.all(np.isfinite(context[rows])):
    bad = int(np.nonzero(~np.all(np.isfinite(context), axis=(1, 2)))[0][0])
    raise BuildError(f"the encoder returned non-finite values for prompt {prompts[bad]!r}.")
  return [context[i, :int(lengths[i])].astype(store) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Writing


def features(d_model: int, store_dtype: str = "bfloat16"):
  """The TFDS features of one example.

  `embedding` is a Tensor with a dynamic first dimension stored as raw bytes (TFDS cannot put
  bfloat16 into a tf.train.Example otherwise), which reads back bit for bit.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.features.FeaturesDict({
      "index": tfds.features.Scalar(np.int64, doc="position of the example in its split"),
      "prompt": tfds.features.Text(doc="the prompt, as in the prompts file"),
      "embedding": tfds.features.Tensor(
          shape=(None, d_model), dtype=_store_dtype(store_dtype), encoding="bytes",
          doc="umT5 context trimmed to the prompt's tokens (incl. EOS): [length, d_model]"),
  })


class _SplitWriter:
  """Streams serialised examples into ArrayRecord shards of at most ~`shard_bytes` each.

  Shards get their final TFDS names (which carry the shard count) in `close`.
  """

  def __init__(self, directory: Path, name: str, split: str, feats, shard_bytes: int):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    self._open = lambda path: array_record_module.ArrayRecordWriter(os.fspath(path),
                                                                    "group_size:1")
    self.directory, self.name, self.split = directory, name, split
    self.features, self.shard_bytes = feats, shard_bytes
    self.shard_lengths: list[int] = []
    self.num_bytes = 0
    self._writer = None
    self._bytes_in_shard = 0

  def _tmp_path(self, i: int) -> Path:
    return self.directory / f"{self.name}-{self.split}.shard{i:05d}.tmp"

  def write(self, example: dict[str, Any]) -> None:
    record = self.features.serialize_example(example)
    full = self._bytes_in_shard > 0 and self._bytes_in_shard + len(record) > self.shard_bytes
    if self._writer is None or full:
      self._close_shard()
      self._writer = self._open(self._tmp_path(len(self.shard_lengths)))
      self.shard_lengths.append(0)
      self._bytes_in_shard = 0
    self._writer.write(record)
    self.shard_lengths[-1] += 1
    self._bytes_in_shard += len(record)
    self.num_bytes += len(record)

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self):
    """Closes the last shard, renames the shards to their TFDS names; returns the SplitInfo."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self._close_shard()
    template = tfds.core.ShardedFileTemplate(
        data_dir=self.directory, template=_FILENAME_TEMPLATE, dataset_name=self.name,
        split=self.split, filetype_suffix="array_record")
    count = len(self.shard_lengths)
    for i in range(count):
      os.replace(self._tmp_path(i), template.sharded_filepath(shard_index=i, num_shards=count))
    return tfds.core.SplitInfo(name=self.split, shard_lengths=list(self.shard_lengths),
                               num_bytes=self.num_bytes, filename_template=template)


def _batches(items: Sequence[str], size: int) -> Iterable[tuple[int, Sequence[str]]]:
  for start in range(0, len(items), size):
    yield start, items[start:start + size]


def _write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def build_dataset(prompts: Sequence[str], out: str | os.PathLike, encode: Encode, *,
                  negative_prompt: str = prompts_lib.WAN_NEGATIVE_PROMPT, text_len: int = 512,
                  batch_size: int = 16, name: str = DEFAULT_NAME, store_dtype: str = "bfloat16",
                  overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  extra_info: dict[str, Any] | None = None, progress: bool = True) -> Path:
  """Encodes `prompts` and writes them, with `negative_prompt`, as a prompt dataset in `out`.

  Args:
    prompts: the prompts, in order; example i is prompts[i].
    out: the dataset directory to create (absent or empty, unless `overwrite`).
    encode: prompts -> (context [N, text_len, d_model] float, zero from row lengths[i] on;
      lengths [N] int), e.g. `asd_jax.text.TextEncoder`.
    negative_prompt: stored once, for classifier-free guidance (default: Wan's).
    text_len: the encoder's padded length (512 for Wan).
    batch_size: prompts per encoder call.
    name: the TFDS dataset name (lowercase letters, digits, underscores).
    store_dtype: 'bfloat16' (default) or 'float32'.
    overwrite: replace an existing non-empty `out`, once the new build is complete.
    shard_bytes: a new ArrayRecord shard starts past about this many bytes.
    extra_info: JSON-able facts added to prompt_dataset.json (e.g. the encoder's paths).
    progress: show a tqdm progress bar.
  Returns:
    The dataset directory (absolute).
  Raises:
    BuildError: bad arguments or encoder output. Whatever the error, `out` is left as it was.
  """
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of str, not one str.")
  prompts = list(prompts)
  if not prompts:
    raise BuildError("no prompts to build a dataset from.")
  if not all(isinstance(p, str) for p in prompts):
    raise TypeError("every prompt must be a str.")
  if not isinstance(negative_prompt, str):
    raise TypeError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}.")
  if not _NAME_RE.match(name):
    raise BuildError(f"name must be lowercase letters, digits and underscores, starting with a "
                     f"letter; got {name!r}.")
  if text_len < 1 or batch_size < 1:
    raise BuildError(f"text_len and batch_size must be >= 1, got {text_len} and {batch_size}.")
  store = _store_dtype(store_dtype)
  out = check_out_dir(out, overwrite=overwrite)
  stale = _stale_partials(out)
  if stale:
    print(f"note: leftovers of interrupted builds (delete them to free space): "
          f"{', '.join(str(s) for s in stale)}", file=sys.stderr)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = _new_sibling(out, _partial_prefix(out))
  try:
    _build_into(tmp, prompts, encode, negative_prompt=negative_prompt, text_len=text_len,
                batch_size=batch_size, name=name, store=store, store_dtype=store_dtype,
                shard_bytes=shard_bytes, extra_info=extra_info, progress=progress)
    _move_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _build_into(tmp: Path, prompts: list[str], encode: Encode, *, negative_prompt: str,
                text_len: int, batch_size: int, name: str, store: np.dtype, store_dtype: str,
                shard_bytes: int, extra_info: dict[str, Any] | None, progress: bool) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  (neg,) = _encode_trimmed(encode, [negative_prompt], text_len, None, store)
  d_model = int(neg.shape[1])
  feats = features(d_model, store_dtype)

  neg_writer = _SplitWriter(tmp, name, prompts_lib.NEGATIVE_SPLIT, feats, shard_bytes)
  neg_writer.write({"index": 0, "prompt": negative_prompt, "embedding": neg})
  splits = [neg_writer.close()]

  writer = _SplitWriter(tmp, name, prompts_lib.TRAIN_SPLIT, feats, shard_bytes)
  total_tokens, max_length = 0, 0
  with tqdm(total=len(prompts), unit="prompt", desc="encoding prompts", disable=not progress,
            dynamic_ncols=True) as bar:
    for start, batch in _batches(prompts, batch_size):
      for i, emb in enumerate(_encode_trimmed(encode, batch, text_len, d_model, store)):
        writer.write({"index": start + i, "prompt": batch[i], "embedding": emb})
        total_tokens += emb.shape[0]
        max_length = max(max_length, emb.shape[0])
        last = emb
      bar.update(len(batch))
      bar.set_postfix(GB=f"{writer.num_bytes / 1e9:.2f}", refresh=False)
  splits.append(writer.close())

  tfds.folder_dataset.write_metadata(
      data_dir=tmp, features=feats, split_infos=splits, filename_template=_FILENAME_TEMPLATE,
      version="1.0.0", check_data=False, disable_shuffling=True,
      description=("Prompts and their umT5 contexts trimmed to the prompt's length, for Wan 2.1 "
                   "distillation; read with asd_jax.data.PromptDataset (see prompt_dataset.json)."))

  # Read back what was written before declaring it complete.
  sources = tfds.builder_from_directory(os.fspath(tmp)).as_data_source()
  got = {s: len(sources[s]) for s in (prompts_lib.TRAIN_SPLIT, prompts_lib.NEGATIVE_SPLIT)}
  if got != {prompts_lib.TRAIN_SPLIT: len(prompts), prompts_lib.NEGATIVE_SPLIT: 1}:
    raise RuntimeError(f"the dataset written to {tmp} reads back {got} examples; expected "
                       f"{len(prompts)} and 1.")
  back = sources[prompts_lib.TRAIN_SPLIT][len(prompts) - 1]
  if int(back["index"]) != len(prompts) - 1 or back["embedding"].tobytes() != last.tobytes():
    raise RuntimeError(f"the last example of {tmp} does not read back as written.")

  info = {
      "format_version": prompts_lib.FORMAT_VERSION,
      "name": name,
      "num_examples": len(prompts),
      "text_len": text_len,
      "d_model": d_model,
      "store_dtype": store_dtype,
      "negative_prompt": negative_prompt,
      "negative_length": int(neg.shape[0]),
      "total_tokens": total_tokens,
      "max_length": max_length,
      "num_bytes": int(writer.num_bytes),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      **(extra_info or {}),
  }
  _write_json(tmp / prompts_lib.MARKER, info)  # last: its presence marks the dataset complete


def _move_into_place(tmp: Path, out: Path) -> None:
  """Renames the finished build to `out` (replacing an old dataset only now)."""
  if out.is_dir() and any(out.iterdir()):  # overwrite: checked by check_out_dir
    old = _new_sibling(out, f".{out.name}.replaced-")
    os.replace(out, old / "old")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    if out.is_dir():
      out.rmdir()  # empty
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m asd_jax.data.build",
      description="Encode a prompts file with umT5 into a TFDS ArrayRecord prompt dataset.")
  p.add_argument("--prompts", required=True,
                 help="UTF-8 text file, one prompt a line (blank lines skipped, duplicates kept).")
  p.add_argument("--out", required=True, help="dataset directory to create (absent or empty).")
  p.add_argument("--umt5", required=True, help="umT5 encoder written by `asd_jax.convert umt5`.")
  p.add_argument("--tokenizer", required=True, help="tokenizer folder (google/umt5-xxl).")
  p.add_argument("--negative_prompt", default=prompts_lib.WAN_NEGATIVE_PROMPT,
                 help="negative prompt stored for CFG (default: Wan 2.1's sample_neg_prompt).")
  p.add_argument("--batch_size", type=int, default=16, help="prompts per encoder call.")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="umT5 compute dtype.")
  p.add_argument("--store_dtype", default="bfloat16", choices=prompts_lib.STORE_DTYPES,
                 help="dtype of the stored contexts.")
  p.add_argument("--text_len", type=int, default=512, help="tokens per prompt (Wan: 512).")
  p.add_argument("--name", default=DEFAULT_NAME, help="TFDS dataset name.")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a non-empty --out once the new build is complete.")
  p.add_argument("--quiet", action="store_true", help="no progress bar.")
  return p


def load_encoder(umt5_dir: str, tokenizer_dir: str, *, dtype: str, text_len: int,
                 batch_size: int) -> Encode:
  """The umT5 TextEncoder (imported here so that the builder itself does not need it)."""
  from asd_jax.text import TextEncoder  # pylint: disable=g-import-not-at-top

  return TextEncoder.load(umt5_dir, tokenizer_dir, dtype=dtype, text_len=text_len,
                          batch_size=batch_size)


def estimate_bytes(prompts: Sequence[str], text_len: int, d_model: int, store_dtype: str) -> int:
  """About the bytes a build of `prompts` writes: each prompt's context trimmed to about one
  token per 3 UTF-8 bytes (umT5's sentencepiece averages nearer 4) plus the end token, capped
  at `text_len`; errs on the large side."""
  itemsize = _store_dtype(store_dtype).itemsize
  tokens = sum(min(text_len, len(p.encode("utf-8")) // 3 + 2) for p in prompts)
  return (tokens + text_len) * d_model * itemsize  # + the negative prompt


def _encoder_width(umt5_dir: str) -> int | None:
  """d_model of a converted umT5 directory (its config.json), None when it does not say."""
  try:
    meta = json.loads((Path(umt5_dir).expanduser() / "config.json").read_text())
    return int(meta["config"]["d_model"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: 0 done, 2 bad input (nothing created), 1 a failure while building.
  `--debug` (or ASD_JAX_DEBUG=1) shows the traceback of an expected failure."""
  from asd_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(_main, argv, usage_errors=(ValueError, FileNotFoundError))


def _main(argv: Sequence[str]) -> int:
  from asd_jax.io import atomic  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  # Everything that can be checked is checked before the (slow) encoder loads.
  if not _NAME_RE.match(args.name):
    raise BuildError(f"--name must be lowercase letters, digits and underscores, starting "
                     f"with a letter; got {args.name!r}.")
  if args.batch_size < 1 or args.text_len < 1:
    raise BuildError(f"--batch_size and --text_len must be >= 1, got {args.batch_size} and "
                     f"{args.text_len}.")
  source = read_prompts(args.prompts)
  out = check_out_dir(args.out, overwrite=args.overwrite)
  for flag in ("umt5", "tokenizer"):
    if not Path(getattr(args, flag)).expanduser().is_dir():
      raise FileNotFoundError(f"--{flag} {getattr(args, flag)} is not a directory.")
  try:
    atomic.check_disjoint(args.prompts, out, "--prompts", "--out")
    atomic.check_writable_dir(out.parent, "--out's folder")
    d_model = _encoder_width(args.umt5)
    if d_model:
      atomic.check_free_space(out, estimate_bytes(source.prompts, args.text_len, d_model,
                                                  args.store_dtype), "the prompt dataset", "--out")
  except atomic.DestinationError as e:
    raise BuildError(str(e)) from None
  print(source.summary(), file=sys.stderr)
  encoder = load_encoder(args.umt5, args.tokenizer, dtype=args.dtype, text_len=args.text_len,
                         batch_size=args.batch_size)
  extra = {"prompts_file": str(source.path.absolute()), "num_blank_lines": source.num_blank,
           "num_duplicates": source.num_duplicates, "umt5": str(Path(args.umt5).absolute()),
           "tokenizer": str(Path(args.tokenizer).absolute()), "encoder_dtype": args.dtype}
  out = build_dataset(source.prompts, args.out, encoder, negative_prompt=args.negative_prompt,
                      text_len=args.text_len, batch_size=args.batch_size, name=args.name,
                      store_dtype=args.store_dtype, overwrite=args.overwrite, extra_info=extra,
                      progress=not args.quiet)
  print(f"wrote {len(source.prompts)} prompts and the negative prompt to {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
