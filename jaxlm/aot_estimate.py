"""What the TPU compiler says a compiled train step costs: step time, FLOPs, collectives.

`jaxlm compile` reads these from libtpu's compiled program (no TPU runs anything), so
every figure here is the compiler's estimate. Two of its blind spots are handled here:

* XLA's cost analysis counts a while loop's body once, so a scanned layer stack or a
  gradient-accumulation loop reports one layer / one microbatch. The step time therefore
  comes from a loop-free compile of the same step (`jaxlm.aot` builds it), and any loop
  left in that program makes the estimate unavailable rather than wrong.
* libtpu 0.0.42's v5e cost model prices every `ConcatBitcast` custom call at exactly -1 s
  (measured by ../shared/bench/maxtext_aot: raw -541.635 s with 542 calls, -1.982 / -5.988
  with 2 / 6), so the count is added back; a value that is still not positive is reported
  as unavailable.

Collectives are counted from the optimized HLO text: each computation weighs as often as
it runs (a while body by its trip count), so a scanned 32-layer loop counts 32 times.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")

# Dense bf16 peak per chip (TFLOP/s), the denominator of the estimated MFU. Sources:
# v4 275: cloud.google.com/tpu/docs/v4 ("Peak compute per chip (bf16) 275 TFLOPs");
# v5e 197: cloud.google.com/tpu/docs/v5e ("Peak compute per chip (bf16) 197 TFLOPs");
# v5p 459: cloud.google.com/tpu/docs/v5p ("Peak compute per chip (bf16) 459 TFLOPs");
# v6e 918: cloud.google.com/tpu/docs/v6e ("Peak compute per chip (bf16) 918 TFLOPs").
# jaxlm.train.metrics.PEAK_TFLOPS (the trainer's MFU, by device kind) carries the same
# numbers; tests/test_aot.py checks that the two agree.
PEAK_BF16_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}

_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)")
_CALLEES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (`f32[16,256]{1,0:T(8,128)}`, or a tuple)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in _BYTES:
            total += math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
    return total


def _split_type(rhs: str) -> tuple[str, str]:
    """`(f32[2], s32[]) opcode(...)` -> the type, and the rest from the opcode on."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                return rhs[: i + 1], rhs[i + 1 :].strip()
    typ, _, rest = rhs.partition(" ")
    return typ, rest.strip()


def _group_size(rest: str) -> int:
    """Devices in one replica group: `{{0,1,2,3}}`, `[2,4]<=[8]` or `mesh[...] {'axis_0'}`."""
    if m := re.search(r"replica_groups=\{\{([\d,]+)\}", rest):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", rest):
        return int(m.group(1))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    return 1


@dataclass
class HloSummary:
    """Collectives per step (count, bytes per chip) and the program's while loops."""

    collectives: dict[str, tuple[int, int]] = field(default_factory=dict)
    loops: list[int | None] = field(default_factory=list)  # trip counts; None = unknown


def summarize_hlo(text: str) -> HloSummary:
    """Count the collectives of an optimized HLO module, each weighted by how often its
    computation runs. Bytes: all-gather its gathered result; reduce-scatter its full input
    (result x group); all-reduce, collective-permute and all-to-all the array. An async
    pair counts once, at `-done`. TPU emits a reduce-scatter as a custom fusion calling an
    `all-reduce-scatter` computation (all-reduce + dynamic-slice): that is a reduce-scatter
    of the all-reduce's array."""
    comps: dict[str, list[tuple[str, str, str]]] = {}  # name -> [(instr, type, rest)]
    entry, cur = "", None
    for line in text.splitlines():
        if cur is None:
            if line[:1] not in ("", " ", "\t", "}") and line.rstrip().endswith("{"):
                head = re.match(r"(ENTRY\s+)?%?([\w.\-]+)", line)
                if head and not line.startswith("HloModule"):
                    cur = head.group(2)
                    comps[cur] = []
                    entry = cur if head.group(1) else entry
            continue
        if line.rstrip() == "}":  # not a "}" opening a line of a kernel's multi-line config
            cur = None
        elif m := _INSTR.match(line):
            typ, rest = _split_type(m.group(2).strip())
            comps[cur].append((m.group(1), typ, rest))

    def trip_count(rest: str) -> int | None:
        if m := re.search(r'"known_trip_count":\{"n":"(\d+)"', rest):
            return int(m.group(1))
        cond = re.search(r"condition=%?([\w.\-]+)", rest)
        body = comps.get(cond.group(1), []) if cond else []
        consts = {
            n: int(k.group(1)) for n, _, r in body if (k := re.match(r"constant\((-?\d+)\)", r))
        }
        for _, _, r in body:  # lax.scan's condition: counter (from 0 by 1) < constant
            if r.startswith("compare(") and "direction=LT" in r:
                args = re.match(r"compare\(([^)]*)\)", r).group(1).split(",")
                bound = args[-1].strip().lstrip("%")
                if bound in consts:
                    return consts[bound]
        return None

    edges: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    reduce_scatter_comps: set[str] = set()
    summary = HloSummary()
    for c, instrs in comps.items():
        for _, _, rest in instrs:
            opcode = rest.split("(", 1)[0]
            if opcode in ("async-update", "async-done"):
                continue  # the same callee as its async-start
            weight = 1
            if opcode == "while":
                trips = trip_count(rest)
                summary.loops.append(trips)
                weight = trips or 1
            callees = _CALLEE.findall(rest)
            for group in _CALLEES.findall(rest):
                callees += [("", n.strip().lstrip("%")) for n in group.split(",")]
            for key, name in callees:
                if name in comps:
                    edges[c].append((name, weight if key in ("body", "condition") else 1))
                    if opcode == "fusion" and name.startswith("all-reduce-scatter"):
                        reduce_scatter_comps.add(name)

    order: list[str] = []
    seen: set[str] = set()
    stack = [(entry or next(iter(comps), ""), False)]
    while stack:  # post-order walk: callees before callers
        c, done = stack.pop()
        if done:
            order.append(c)
        elif c in comps and c not in seen:
            seen.add(c)
            stack.append((c, True))
            stack.extend((callee, False) for callee, _ in edges[c])
    runs = dict.fromkeys(comps, 0)
    if order:
        runs[order[-1]] = 1
    for c in reversed(order):
        for callee, weight in edges[c]:
            runs[callee] += runs[c] * weight

    counts = {k: [0, 0] for k in COLLECTIVES}
    for c, instrs in comps.items():
        for _, typ, rest in instrs:
            opcode = rest.split("(", 1)[0]
            if opcode.endswith("-start"):
                continue
            kind = opcode.removesuffix("-done")
            if kind not in counts:
                continue
            nbytes = array_bytes(typ)
            if kind == "reduce-scatter":
                nbytes *= _group_size(rest)
            elif kind == "all-reduce" and c in reduce_scatter_comps:
                kind = "reduce-scatter"
            counts[kind][0] += runs[c]
            counts[kind][1] += runs[c] * nbytes
    summary.collectives = {k: (n, b) for k, (n, b) in counts.items()}
    return summary


@dataclass
class StepEstimate:
    """The compiler's cost-model figures for one whole step, per chip."""

    method: str  # how the whole step was compiled for the estimate
    seconds: float = 0.0  # optimal_seconds, ConcatBitcast-corrected
    seconds_raw: float = 0.0  # as libtpu returned it
    concat_bitcasts: int = 0
    xla_flops: float = 0.0
    bytes_accessed: float = 0.0
    unavailable: str = ""  # why there is no usable estimate

    @property
    def ok(self) -> bool:
        return not self.unavailable


def estimate_from_compiled(
    compiled: Any, method: str, scale: int = 1, loops: list[int | None] | None = None
) -> StepEstimate:
    """Read `cost_analysis()` of a compiled step; `scale` multiplies a microbatch's cost
    up to the step. Nonsense (a loop the cost model counts once, a time that is not
    positive after the ConcatBitcast correction) becomes `unavailable`."""
    est = StepEstimate(method=method)
    cost = compiled.cost_analysis()
    cost = dict((cost[0] if isinstance(cost, list) else cost) or {})
    if "optimal_seconds" not in cost:
        est.unavailable = "libtpu's cost analysis has no optimal_seconds"
        return est
    text = compiled.as_text()
    loops = summarize_hlo(text).loops if loops is None else loops
    est.seconds_raw = float(cost["optimal_seconds"])
    est.concat_bitcasts = text.count('custom_call_target="ConcatBitcast"')
    est.seconds = (est.seconds_raw + est.concat_bitcasts) * scale
    est.xla_flops = float(cost.get("flops", 0.0)) * scale
    est.bytes_accessed = float(cost.get("bytes accessed", 0.0)) * scale
    looping = [t for t in loops if t != 1]
    if looping:
        trips = ", ".join("?" if t is None else str(t) for t in looping)
        est.unavailable = (
            f"the estimated program still has {len(looping)} while loop(s) (trip counts "
            f"{trips}), whose bodies XLA's cost model counts once"
        )
    elif est.seconds <= 0:
        est.unavailable = (
            f"the cost model returned optimal_seconds {est.seconds_raw:.6g} "
            f"({est.concat_bitcasts} ConcatBitcast calls added back): not a time"
        )
    return est
