"""Where a compiled program's time would go: a roofline model read from its optimized HLO.

`breakdown(compiled, target)` walks `compiled.as_text()` (the program one device runs, read by
`asd_jax.plan.hlo`) and
multiplies every computation by how many times it runs: a while loop's body by its trip count
(from `known_trip_count` in its backend_config where XLA records it, as the CPU and GPU compilers
do, else from the loop's own counter: `i < N` in its condition, i's initial value and its constant
step, as the TPU compiler leaves it), nested loops, calls and fusions composing. A loop whose count
is not static (e.g. `fori_loop(0, e + 1)` over a random exit index) is counted once and named in
the result. Per device it sums:

- matmul FLOPs: dot and convolution (and cuBLAS GEMM custom calls on GPU), 2 per multiply-add, from
  the operand and result shapes and the contracting dimensions, inside fusions too;
- memory bytes: operands + result of every op at the top level of a computation (a fusion counts
  at its boundary), the traffic of a roofline memory term. It is an approximation: a fusion
  operand only sliced inside the fusion counts its slices, an in-place dynamic-update-slice its
  update, but caches (VMEM, L2), re-reads within an op and layout padding are not modelled;
- collective bytes by kind (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute; an async -start/-done pair counts once): the buffer each device contributes
  and the bytes a ring algorithm sends per device;
- custom calls (Pallas/Mosaic `tpu_custom_call`, cuDNN `__cudnn$...`) by name, with run counts:
  XLA prices them at about zero, so attention kernels are timed from their analytic FLOPs
  (`asd_jax.plan.flops`, the `attention` part of a count) at an assumed kernel efficiency.

Seconds = matmul FLOPs / bf16 peak + memory bytes / HBM bandwidth + ring bytes / (interconnect
bandwidth / 2) + attention FLOPs per device / (peak x efficiency), from the target's data sheet
(`asd_jax.targets`). All of it is a model (a roofline estimate), not a measurement: it assumes
no overlap between the parts (`total_seconds`; `overlap_seconds` is the largest part alone, the
perfect-overlap bound), every op at peak, and collectives over every link of a device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from asd_jax.plan.hlo import (Computation, Instr, conv_flops, dot_flops, gemm_flops, parse,
                              shape_bytes, through, trip_count)

DEFAULT_KERNEL_EFFICIENCY = 0.5  # assumed share of peak an attention kernel reaches (not measured)

# Ops that move no data of their own (or are priced elsewhere: loops, calls, async halves).
_NO_DATA = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
            "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
            "add-dependency", "domain", "async-start", "async-update", "async-done",
            "copy-start", "copy-done", "send-done", "recv-done", "custom-call"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# XLA's bookkeeping custom calls: no kernel runs.
_BOOKKEEPING = {"AllocateBuffer", "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked",
                "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost",
                "MoveToDevice", "annotate_device_placement", "LayoutConstraint", "X64Combine",
                "X64SplitLow", "X64SplitHigh"}
_ATTENTION = re.compile(r"splash|flash|mha|fmha|attention", re.I)


# -------------------------------------------------------------------------------------- the walk


def _replica_group_size(instr: Instr, num_devices: int) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", instr.attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", instr.attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  return num_devices


def _read_bytes(comp: Computation, name: str, comps: dict[str, Computation],
                depth: int = 0) -> float | None:
  """Bytes of value `name` that `comp` reads when it reads it only through (dynamic-)slices,
  through bitcasts and nested fusions too; None when something reads it whole."""
  if name == comp.root:
    return None  # the computation's result: read whole by whatever takes it
  total = 0.0
  for user in comp.users().get(name, []):
    if user.opcode in ("dynamic-slice", "slice") and user.operands[0] == name:
      total += shape_bytes(user.shape)
      continue
    inner = comps.get(user.attr("calls") or "") if user.opcode == "fusion" else None
    if user.opcode == "bitcast":
      part = _read_bytes(comp, user.name, comps, depth + 1)
    elif inner is not None and depth < 8:
      params = inner.params()
      part = 0.0
      for k in (k for k, o in enumerate(user.operands) if o == name):
        sub = _read_bytes(inner, params[k].name, comps, depth + 1) if k in params else None
        part = None if sub is None or part is None else part + sub
    else:
      part = None
    if part is None:
      return None
    total += part
  return total


def _fusion_bytes(instr: Instr, caller: Computation, comps: dict[str, Computation]) -> float:
  """Operands + result of a fusion, counting what it really reads and writes: an operand used
  only through (dynamic-)slices inside counts those slices (a scanned layer stack's weights: one
  layer an iteration), an in-place dynamic-update-slice root counts its update instead of the
  whole buffer it writes into."""
  operand_bytes = [shape_bytes(caller.instrs[o].shape) if o in caller.instrs else 0.0
                   for o in instr.operands]
  result = shape_bytes(instr.shape)
  fused = comps.get(instr.attr("calls") or "")
  if fused is None:
    return sum(operand_bytes) + result
  for k, p in fused.params().items():
    if k < len(operand_bytes):
      read = _read_bytes(fused, p.name, comps)
      if read is not None:
        operand_bytes[k] = min(operand_bytes[k], read)
  root = fused.instrs.get(fused.root or "")
  outs = [fused.instrs.get(o) for o in root.operands] if root and root.opcode == "tuple" else [root]
  for out in outs:
    if out is not None and out.opcode == "dynamic-update-slice":
      target = through(fused, out.operands[0])
      update = fused.instrs.get(out.operands[1])
      if target is not None and target.opcode == "parameter" and update is not None:
        k = int(target.args)
        if k < len(operand_bytes):
          operand_bytes[k] = 0.0  # aliased: written in place
        result += shape_bytes(update.shape) - shape_bytes(out.shape)
  return sum(operand_bytes) + max(result, 0.0)


@dataclasses.dataclass
class Breakdown:
  """Per-device figures of one compiled program, loop-scaled (see the module docstring)."""
  matmul_flops: float = 0.0
  memory_bytes: float = 0.0
  # {kind: {count, bytes: the full buffer (the gathered result of an all-gather, else the
  # operand), ring_bytes: what a ring algorithm sends per device}}
  collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  custom_calls: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  loops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  unknown_loops: list[str] = dataclasses.field(default_factory=list)  # counted once
  conditionals: int = 0  # every branch counted (an upper bound)
  top_ops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  num_devices: int = 1
  # (runs, name, op_name, FLOPs, bytes) of every top-level op, for `estimate`'s ranking.
  ops: list[tuple[float, str, str, float, float]] = dataclasses.field(default_factory=list,
                                                                      repr=False)
  # Time model (seconds, per device) and the FLOP ratio; filled by `estimate`.
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  total_seconds: float | None = None
  overlap_seconds: float | None = None
  kernel_efficiency: float | None = None
  attention_flops: float | None = None  # analytic, whole program (all devices)
  attention_in_kernels: bool = False
  compiled_flops: float | None = None  # matmul x devices + attention (kernels), all devices
  analytic_flops: float | None = None
  flop_ratio: float | None = None  # compiled / analytic
  xla_seconds: float | None = None  # XLA's own cost model (TPU), kept alongside

  @property
  def collective_bytes(self) -> float:
    return sum(c["bytes"] for c in self.collectives.values())

  def items(self) -> list[tuple[str, float]]:
    """The time model's parts, largest first."""
    return sorted(self.seconds.items(), key=lambda kv: -kv[1])

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    del d["ops"]
    d["collective_bytes"] = self.collective_bytes
    d["model"] = ("roofline estimate from the optimized HLO and the target's data sheet, not a "
                  "measurement; see asd_jax/plan/breakdown.py")
    return d


def walk(text: str, num_devices: int = 1) -> Breakdown:
  """Loop-scaled per-device matmul FLOPs, memory and collective bytes, custom calls of HLO text."""
  comps, entry = parse(text)
  out = Breakdown(num_devices=num_devices)
  # Multiplicity of each computation, callers before callees (the call graph is a DAG).
  order: list[tuple[str, bool]] = []
  seen: set[tuple[str, bool]] = set()
  edges: dict[tuple[str, bool], list[tuple[tuple[str, bool], float]]] = {}

  def visit(key: tuple[str, bool]) -> None:
    if key in seen:
      return
    seen.add(key)
    name, fused = key
    comp = comps[name]
    kids: list[tuple[tuple[str, bool], float]] = []
    for instr in comp.instrs.values():
      if instr.opcode == "while":
        n = trip_count(instr, comp, comps)
        if not fused:
          out.loops.append({"name": instr.name, "trip_count": n, "op_name": instr.op_name})
          if n is None:
            out.unknown_loops.append(f"{instr.name} ({instr.op_name or 'no op_name'})")
        n = 1 if n is None else n
        for attr, times in (("body", n), ("condition", n + 1)):
          if instr.attr(attr) in comps:
            kids.append(((instr.attr(attr), fused), times))
      elif instr.opcode == "fusion" and instr.attr("calls") in comps:
        kids.append(((instr.attr("calls"), True), 1))
      elif instr.opcode in ("call", "async-start") and (instr.attr("to_apply") or
                                                         instr.attr("calls")) in comps:
        kids.append(((instr.attr("to_apply") or instr.attr("calls"), fused), 1))
      elif instr.opcode == "conditional":
        out.conditionals += 1
        for branch in re.findall(r"%([\w.\-]+)", " ".join(re.findall(
            r"(?:branch_computations=\{[^}]*\}|true_computation=%[\w.\-]+|"
            r"false_computation=%[\w.\-]+)", instr.attrs))):
          if branch in comps:
            kids.append(((branch, fused), 1))
    edges[key] = kids
    for kid, _ in kids:
      visit(kid)
    order.append(key)

  visit((entry, False))
  times: dict[tuple[str, bool], float] = {(entry, False): 1.0}
  for key in reversed(order):  # reverse post-order: every caller before its callees
    for kid, n in edges[key]:
      times[kid] = times.get(kid, 0.0) + times.get(key, 0.0) * n

  ops: list[tuple[float, str, str, float, float]] = []
  for (name, fused), m in times.items():
    comp = comps[name]
    for instr in comp.instrs.values():
      op = instr.opcode
      flops = 0.0
      if op == "dot":
        flops = dot_flops(instr, comp)
      elif op == "convolution":
        flops = conv_flops(instr, comp)
      elif op == "custom-call" and "__cublas$" in instr.attrs:
        flops = gemm_flops(instr, comp)
      out.matmul_flops += m * flops
      kind = next((c for c in COLLECTIVES if op in (c, c + "-start")), None)
      if kind is not None:
        n = _replica_group_size(instr, num_devices)
        size = sum(shape_bytes(comp.instrs[o].shape) for o in instr.operands
                   if o in comp.instrs)
        if op == kind:  # the result too: TPU all-reduces may take bf16 in and reduce in f32
          per_operand = {"all-gather": 1 / n, "reduce-scatter": n}.get(kind, 1)
          size = max(size, shape_bytes(instr.shape) * per_operand)
        buffer = size * n if kind == "all-gather" else size
        ring = {"all-gather": (n - 1) * size, "reduce-scatter": (n - 1) / n * size,
                "all-reduce": 2 * (n - 1) / n * size, "all-to-all": (n - 1) / n * size,
                "collective-permute": size}[kind]
        c = out.collectives.setdefault(kind, {"count": 0, "bytes": 0.0, "ring_bytes": 0.0})
        c["count"] += m
        c["bytes"] += m * buffer
        c["ring_bytes"] += m * ring
        continue
      if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', instr.attrs)
        target = target.group(1) if target else "?"
        if target in _BOOKKEEPING or target.startswith("__cublas$"):
          if flops:
            ops.append((m, instr.name, instr.op_name, flops, 0.0))
          continue
        label = re.sub(r"(\.\d+)+$", "", instr.name) if target == "tpu_custom_call" else target
        io = shape_bytes(instr.shape) + sum(shape_bytes(comp.instrs[o].shape)
                                            for o in instr.operands if o in comp.instrs)
        cc = out.custom_calls.setdefault(label, {"target": target, "count": 0, "bytes": 0.0})
        cc["count"] += m
        cc["bytes"] += m * io
        continue
      if fused or op in _NO_DATA or op.endswith("-done"):
        continue
      if op == "fusion":
        moved = _fusion_bytes(instr, comp, comps)
        flops = _fused_flops(comps, instr.attr("calls"))
      elif op == "dynamic-update-slice" and len(instr.operands) > 1:
        moved = 2 * shape_bytes(comp.instrs[instr.operands[1]].shape) if (
            instr.operands[1] in comp.instrs) else 0.0
      elif op in ("dynamic-slice", "slice"):
        moved = 2 * shape_bytes(instr.shape)
      else:
        moved = shape_bytes(instr.shape) + sum(shape_bytes(comp.instrs[o].shape)
                                               for o in instr.operands if o in comp.instrs)
      out.memory_bytes += m * moved
      ops.append((m, instr.name, instr.op_name, flops, moved))
  out.custom_calls = dict(sorted(out.custom_calls.items(), key=lambda kv: -kv[1]["count"]))
  out.ops = ops  # ranked by `estimate`, once the target's peak and bandwidth are known
  return out


def _fused_flops(comps: dict[str, Computation], name: str | None, depth: int = 0) -> float:
  """Matmul FLOPs inside a fused computation (nested fusions included), for ranking ops."""
  comp = comps.get(name or "")
  if comp is None or depth > 8:
    return 0.0
  total = 0.0
  for instr in comp.instrs.values():
    if instr.opcode == "dot":
      total += dot_flops(instr, comp)
    elif instr.opcode == "convolution":
      total += conv_flops(instr, comp)
    elif instr.opcode == "fusion":
      total += _fused_flops(comps, instr.attr("calls"), depth + 1)
  return total


# ------------------------------------------------------------------------------------ the model


def check_kernel_efficiency(value: float) -> float:
  """`value` when it is a share of peak in (0, 1]; ValueError otherwise."""
  if not 0 < value <= 1:
    raise ValueError(f"kernel_efficiency must be in (0, 1], got {value}")
  return value


def estimate(b: Breakdown, target, analytic_flops: float | None = None,
             attention_flops: float | None = None,
             kernel_efficiency: float = DEFAULT_KERNEL_EFFICIENCY,
             xla_seconds: float | None = None, top: int = 8) -> Breakdown:
  """Adds the time model and the compiled/analytic FLOP ratio to a walked program.

  Args:
    b: `walk`'s result.
    target: an `asd_jax.targets.Target` (peak, HBM and interconnect bandwidth per device).
    analytic_flops: the program's analytic minimum (all devices), `asd_jax.plan.flops`.
    attention_flops: its attention part (all devices). Timed, and added to the compiled FLOPs,
      only when the program runs attention in custom kernels (otherwise XLA's dots hold it).
    kernel_efficiency: the assumed share of peak the attention kernels reach (an assumption).
    xla_seconds: XLA's own cost-model estimate, kept alongside.
    top: how many of the costliest top-level ops (runs x max(FLOP time, byte time)) to list.
  """
  check_kernel_efficiency(kernel_efficiency)
  peak, hbm = target.peak_bf16_flops_per_device, target.hbm_bandwidth_per_device
  link = getattr(target, "interconnect_bandwidth_per_device", 0.0) or 0.0
  b.kernel_efficiency = kernel_efficiency
  b.analytic_flops, b.attention_flops, b.xla_seconds = analytic_flops, attention_flops, xla_seconds
  b.attention_in_kernels = any(_ATTENTION.search(k) for k in b.custom_calls)
  seconds = {"matmul": b.matmul_flops / peak, "memory": b.memory_bytes / hbm}
  ring = sum(c["ring_bytes"] for c in b.collectives.values())
  if b.collectives:
    # One direction of a bidirectional data-sheet figure: a ring sends and receives at once.
    seconds["collectives"] = ring / (link / 2) if link else math.inf
  if b.attention_in_kernels and attention_flops:
    seconds["attention kernels"] = attention_flops / b.num_devices / (peak * kernel_efficiency)
  b.seconds = seconds
  b.total_seconds = sum(seconds.values())
  b.overlap_seconds = max(seconds.values())
  b.compiled_flops = b.matmul_flops * b.num_devices + (
      attention_flops if b.attention_in_kernels and attention_flops else 0.0)
  b.flop_ratio = b.compiled_flops / analytic_flops if analytic_flops else None
  ranked = sorted(b.ops, key=lambda o: -o[0] * max(o[3] / peak, o[4] / hbm))
  b.top_ops = [{"name": name, "op_name": op_name[-160:], "runs": m, "flops": m * f,
                "bytes": m * by, "seconds": m * max(f / peak, by / hbm)}
               for m, name, op_name, f, by in ranked[:top]]
  return b


def breakdown(compiled, target, analytic_flops: float | None = None,
              attention_flops: float | None = None,
              kernel_efficiency: float = DEFAULT_KERNEL_EFFICIENCY,
              xla_seconds: float | None = None, top: int = 8) -> Breakdown:
  """`walk` + `estimate` of a compiled program (`jax.jit(f).lower(...).compile()`) for target."""
  b = walk(compiled.as_text(), num_devices=target.num_devices)
  return estimate(b, target, analytic_flops, attention_flops, kernel_efficiency, xla_seconds, top)


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def _time(s: float) -> str:
  if math.isinf(s):
    return "inf s"
  if s < 1e-3:
    return f"{s * 1e6:.3g} us"
  return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def lines(name: str, d: dict[str, Any]) -> list[str]:
  """A compact "where the time goes" block for a table, largest parts first.

  d: `Breakdown.to_dict()` (as a plan's JSON holds it).
  """
  if d.get("error"):
    return [f"  {name}: no breakdown ({d['error']})"]
  colls = sorted(d["collectives"].items(), key=lambda kv: -kv[1]["ring_bytes"])
  detail = {"matmul": f"{_si(d['matmul_flops'], 'FLOP')}/device",
            "memory": f"{_si(d['memory_bytes'], 'B')} moved",
            "collectives": ", ".join(f"{k} {_si(v['bytes'], 'B')}" for k, v in colls),
            "attention kernels": f"{_si(d['attention_flops'] or 0, 'FLOP')} analytic at "
                                 f"{100 * d['kernel_efficiency']:.0f}% of peak, assumed"}
  parts = sorted(d["seconds"].items(), key=lambda kv: -kv[1])
  out = [f"  {name}: " + "; ".join(f"{k} {_time(s)} ({detail[k]})" for k, s in parts) +
         f"; sum {_time(d['total_seconds'])}" +
         (f" (XLA's cost model: {_time(d['xla_seconds'])})" if d.get("xla_seconds") else "")]
  extra = []
  unknown = len(d["unknown_loops"])
  if d.get("flop_ratio") is not None:
    extra.append(f"compiled/analytic FLOPs {d['flop_ratio']:.2f}x" +
                 (" (at least: loops counted once)" if unknown else ""))
  if d["custom_calls"]:
    extra.append("kernels " + ", ".join(f"{k} x{v['count']:g}"
                                        for k, v in list(d["custom_calls"].items())[:4]))
  if unknown:
    extra.append(f"{unknown} loop(s) without a static trip count, counted once")
  for t in d["top_ops"][:2]:
    extra.append(f"op {t['name']} x{t['runs']:g} {_time(t['seconds'])} "
                 f"({t['op_name'][-60:] or 'no op_name'})")
  out += [f"    {x}" for x in extra]
  return out


__all__ = ["Breakdown", "breakdown", "estimate", "walk", "parse", "lines", "shape_bytes",
           "trip_count", "DEFAULT_KERNEL_EFFICIENCY", "COLLECTIVES"]
