"""Optimized HLO text, read: computations, instructions, shapes, matmul FLOPs, loop trip counts.

What `asd_jax.plan.breakdown` walks: `compiled.as_text()` of a jitted program (one device's
program under SPMD). Only what the breakdown needs is parsed: each instruction's name, shape,
opcode, operands and its attributes as text (looked up with small regexes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

# Bytes per element; sub-byte types as fractions. f8 variants (f8e4m3fn, ...) by prefix.
_DTYPE_BYTES = {"pred": 1, "s2": .25, "u2": .25, "s4": .5, "u4": .5, "s8": 1, "u8": 1, "s16": 2,
                "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")

# ------------------------------------------------------------------------------------------ parse


@dataclasses.dataclass
class Instr:
  """One HLO instruction: `name = shape opcode(operands), attrs`."""
  name: str
  shape: str
  opcode: str
  operands: list[str]
  args: str  # the text between the opcode's parentheses
  attrs: str  # everything after them
  root: bool = False

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""


@dataclasses.dataclass
class Computation:
  """One computation: its instructions by name and its root. Read-only once parsed (`params`
  and `users` are computed once)."""
  name: str
  instrs: dict[str, Instr] = dataclasses.field(default_factory=dict)
  root: str | None = None

  @functools.cached_property
  def _params(self) -> dict[int, Instr]:
    return {int(i.args): i for i in self.instrs.values() if i.opcode == "parameter"}

  @functools.cached_property
  def _users(self) -> dict[str, list[Instr]]:
    out: dict[str, list[Instr]] = {}
    for i in self.instrs.values():
      for o in i.operands:
        out.setdefault(o, []).append(i)
    return out

  def params(self) -> dict[int, Instr]:
    """Parameter number -> its instruction."""
    return self._params

  def users(self) -> dict[str, list[Instr]]:
    """Instruction name -> the instructions that take it as an operand."""
    return self._users


def _scan(text: str, start: int = 0):
  """(index, depth after the character) for text[start:], brackets outside double quotes."""
  depth, quoted, escape = 0, False, False
  for k in range(start, len(text)):
    ch = text[k]
    if quoted:
      if escape:
        escape = False
      elif ch == "\\":
        escape = True
      elif ch == '"':
        quoted = False
    elif ch == '"':
      quoted = True
    elif ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    yield k, depth


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _balance(text: str) -> int:
  """Open minus closed brackets of any kind, outside double-quoted strings."""
  bare = _QUOTED.sub("", text)
  return sum(bare.count(c) for c in "({[") - sum(bare.count(c) for c in ")}]")


def _closing(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start] (quotes respected)."""
  for k, depth in _scan(text, start):
    if depth == 0:
      return k + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


_INSTR = re.compile(r"^\s+(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_COMMENT = re.compile(r"/\*.*?\*/")


def _parse_instr(text: str, root: bool, name: str) -> Instr:
  text = _COMMENT.sub("", text)
  if text.startswith("("):
    end = _closing(text, 0)
  else:
    m = re.match(r"[\w\-]+\[[^\]]*\]", text)
    end = m.end() if m else text.index(" ")
    if end < len(text) and text[end] == "{":
      end = _closing(text, end)
  shape, rest = text[:end], text[end:].lstrip()
  m = re.match(r"([\w\-]+)\(", rest)
  if not m:
    raise ValueError(f"cannot parse HLO instruction %{name}: {text[:120]!r}")
  close = _closing(rest, m.end() - 1)
  args = rest[m.end():close - 1]
  return Instr(name=name, shape=shape, opcode=m.group(1), args=args,
               operands=re.findall(r"%([\w.\-]+)", args), attrs=rest[close:], root=root)


def parse(text: str) -> tuple[dict[str, Computation], str]:
  """The computations of an HLO module's text, and the name of its entry computation."""
  comps: dict[str, Computation] = {}
  entry = None
  comp: Computation | None = None
  pending: list[str] = []  # an instruction whose brackets are still open
  head: tuple[bool, str] | None = None

  def flush():
    nonlocal pending, head
    if pending and comp is not None and head is not None:
      instr = _parse_instr(" ".join(pending), *head)
      comp.instrs[instr.name] = instr
      if instr.root:
        comp.root = instr.name
    pending, head = [], None

  for line in text.splitlines():
    if pending and _balance(" ".join(pending)) > 0:
      pending.append(line.strip())
      continue
    flush()
    m = _INSTR.match(line)
    if comp is not None and m:
      head = (bool(m.group(1)), m.group(2))
      pending = [line[m.end():]]
      continue
    m = _HEADER.match(line)
    if m:
      comp = Computation(m.group(2))
      comps[comp.name] = comp
      if m.group(1):
        entry = comp.name
      continue
    if line.strip() == "}":
      comp = None
  flush()
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    size = [int(d.lstrip("<=")) for d in dims.split(",") if d.strip()]
    out.append((dtype, tuple(size)))
  return out


def _dtype_bytes(dtype: str) -> float:
  if dtype in _DTYPE_BYTES:
    return _DTYPE_BYTES[dtype]
  if dtype.startswith("f8"):
    return 1
  if dtype.startswith("f4"):
    return .5
  return 0


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape (a tuple: the sum of its arrays); logical sizes, no layout padding."""
  return sum(math.prod(dims) * _dtype_bytes(dtype) for dtype, dims in _arrays(shape))


def _dims(shape: str) -> tuple[int, ...]:
  arrays = _arrays(shape)
  return arrays[0][1] if arrays else ()


def _int_list(attrs: str, key: str) -> list[int]:
  m = re.search(rf"\b{key}=\{{([\d,]*)\}}", attrs)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


# ---------------------------------------------------------------------------------------- FLOPs


def dot_flops(instr: Instr, comp: Computation) -> float:
  """2 x output elements x contracted size of a dot."""
  lhs = comp.instrs.get(instr.operands[0]) if instr.operands else None
  if lhs is None:
    return 0.0
  lhs_dims = _dims(lhs.shape)
  contracted = math.prod(lhs_dims[d] for d in _int_list(instr.attrs, "lhs_contracting_dims"))
  return 2.0 * math.prod(_dims(instr.shape)) * contracted


def conv_flops(instr: Instr, comp: Computation) -> float:
  """2 x output elements x (kernel elements per output feature) of a convolution."""
  if len(instr.operands) < 2 or instr.operands[1] not in comp.instrs:
    return 0.0
  kernel = _dims(comp.instrs[instr.operands[1]].shape)
  m = re.search(r"dim_labels=[^_]+_([^-]+)->", instr.attrs)
  if not m or len(m.group(1)) != len(kernel):
    return 0.0
  per_output = math.prod(n for n, label in zip(kernel, m.group(1)) if label != "o")
  return 2.0 * math.prod(_dims(instr.shape)) * per_output


def gemm_flops(instr: Instr, comp: Computation) -> float:
  """A cuBLAS GEMM custom call (GPU): dims from its backend_config's dot_dimension_numbers."""
  m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs)
  lhs = comp.instrs.get(instr.operands[0]) if instr.operands else None
  if not m or lhs is None:
    return 0.0
  lhs_dims = _dims(lhs.shape)
  contracted = math.prod(lhs_dims[int(d.strip('" '))] for d in m.group(1).split(",") if d.strip())
  return 2.0 * math.prod(_dims(instr.shape)) * contracted  # the first array: the product


# ---------------------------------------------------------------------------------- trip counts


def through(comp: Computation, name: str) -> Instr | None:
  """The instruction behind copies, bitcasts and converts."""
  instr = comp.instrs.get(name)
  while instr is not None and instr.opcode in ("copy", "bitcast", "convert", "reshape") and (
      instr.operands):
    instr = comp.instrs.get(instr.operands[0])
  return instr


def _constant(instr: Instr | None) -> int | None:
  if instr is None or instr.opcode != "constant":
    return None
  try:
    return int(float(instr.args))
  except ValueError:
    return None


def _gte_index(instr: Instr | None, param: str) -> int | None:
  """k when `instr` is get-tuple-element(param), index=k."""
  if instr is None or instr.opcode != "get-tuple-element" or instr.operands != [param]:
    return None
  m = re.search(r"\bindex=(\d+)", instr.attrs)
  return int(m.group(1)) if m else None


def trip_count(loop: Instr, caller: Computation, comps: dict[str, Computation]) -> int | None:
  """The loop's trip count: XLA's `known_trip_count`, else its counter's `i < N` pattern."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
  if m:
    return int(m.group(1))
  cond, body = comps.get(loop.attr("condition") or ""), comps.get(loop.attr("body") or "")
  init = caller.instrs.get(loop.operands[0]) if loop.operands else None
  if cond is None or body is None or init is None or init.opcode != "tuple":
    return None
  cparam = next((p.name for p in cond.params().values()), None)
  compare = cond.instrs.get(cond.root or "")
  if compare is None or compare.opcode != "compare" or len(compare.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", compare.attrs)
  direction = direction.group(1) if direction else ""
  a, b = (through(cond, o) for o in compare.operands)
  ia, ib = _gte_index(a, cparam), _gte_index(b, cparam)

  def value(instr: Instr | None, index: int | None) -> int | None:
    """A constant, or a loop-invariant tuple element whose initial value is a constant."""
    if index is None:
      return _constant(instr)
    body_root = body.instrs.get(body.root or "")
    bparam = next((p.name for p in body.params().values()), None)
    if body_root is None or body_root.opcode != "tuple" or index >= len(body_root.operands):
      return None
    if _gte_index(through(body, body_root.operands[index]), bparam) != index:
      return None  # changes in the loop
    return _constant(through(caller, init.operands[index])) if index < len(init.operands) else None

  if direction in ("GT", "GE"):  # N > i is i < N
    a, b, ia, ib = b, a, ib, ia
    direction = {"GT": "LT", "GE": "LE"}[direction]
  if direction not in ("LT", "LE", "NE") or ia is None or ia >= len(init.operands):
    return None
  bound = value(b, ib)
  start = _constant(through(caller, init.operands[ia]))
  body_root = body.instrs.get(body.root or "")
  bparam = next((p.name for p in body.params().values()), None)
  if bound is None or start is None or body_root is None or body_root.opcode != "tuple":
    return None
  step_instr = through(body, body_root.operands[ia])
  if step_instr is None or step_instr.opcode != "add":
    return None
  x, y = (through(body, o) for o in step_instr.operands)
  if _gte_index(x, bparam) == ia:
    step = _constant(y)
  elif _gte_index(y, bparam) == ia:
    step = _constant(x)
  else:
    return None
  if not step or step < 0:
    return None
  span = bound - start + (1 if direction == "LE" else 0)
  return max(0, -(-span // step))
