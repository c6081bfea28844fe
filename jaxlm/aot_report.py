"""What `jaxlm compile` prints for a compiled step: the report as text, and as JSON.

Apart from compiling (`jaxlm.aot`), so a reader of either finds one concept: the
figures and their caveats are worded here, and only here.
"""

from __future__ import annotations

from typing import Any

from jaxlm.aot import GIB, CompileReport
from jaxlm.aot_estimate import COLLECTIVES


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _batch_line(r: CompileReport) -> str:
    line = f"batch: {r.batch_size} rows of {r.seq_len} tokens per step"
    if r.grad_accum > 1:
        return (
            f"{line}, as {r.grad_accum} microbatches of {r.batch_size // r.grad_accum} rows "
            f"(train.grad_accum={r.grad_accum})"
        )
    return f"{line} (train.grad_accum=1)"


def _collective_lines(r: CompileReport) -> list[str]:
    lines = ["collectives per step, per chip (optimized HLO; a loop body x its trip count):"]
    for kind in COLLECTIVES:
        n, nbytes = r.collectives.get(kind, (0, 0))
        lines.append(f"  {kind:<19} {n:>7,}  {_gib(nbytes)}")
    return lines


def _estimate_lines(r: CompileReport) -> list[str]:
    e = r.estimate
    if e is None:
        return []
    head = "compiler's estimates (libtpu's cost model, not a measurement)"
    if not e.ok:
        return [f"{head}: estimate unavailable: {e.unavailable}"]
    peak = r.peak_flops
    model = r.flops_per_step / r.chips
    fix = (
        f" (raw {e.seconds_raw:.4g} s + {e.concat_bitcasts} ConcatBitcast calls "
        "the cost model prices at -1 s each)"
        if e.concat_bitcasts
        else ""
    )
    lines = [
        f"{head}, from {e.method}:",
        f"  step time        {e.seconds:.4g} s{fix}",
        f"  tokens/s/chip    {r.tokens_per_s_per_chip:,.0f}",
        f"  MFU              {100 * r.mfu:.1f}% (model FLOPs per chip / (time x "
        f"{peak / 1e12:.0f} TFLOP/s bf16 peak))",
        f"  FLOPs per chip   XLA {e.xla_flops:.3e}, model {model:.3e} "
        f"(XLA/model {e.xla_flops / model:.2f})",
        f"  bytes accessed   {e.bytes_accessed / 1e9:.1f} GB per chip",
    ]
    if r.kernels:
        lines.append(
            "  not priced: the Pallas kernels above have no cost estimate, so their FLOPs "
            "and time are missing from these figures"
        )
    return lines


def report_json(r: CompileReport) -> dict[str, Any]:
    """The report's figures as plain JSON values (`jaxlm compile --json`)."""
    e = r.estimate
    return {
        "topology": r.topology.name,
        "libtpu_topology": r.topology.libtpu_name,
        "slices": r.slices,
        "chips": r.chips,
        "mesh": r.mesh,
        "n_params": r.n_params,
        "batch_size": r.batch_size,
        "seq_len": r.seq_len,
        "grad_accum": r.grad_accum,
        "kernels": r.kernels,
        "kernel_calls": r.kernel_calls,
        "error": r.error,
        "fits": r.fits,
        "hbm_bytes": r.topology.hbm_bytes,
        "memory_bytes": {
            "arguments": r.argument_bytes,
            "outputs_not_donated": r.output_bytes - r.alias_bytes,
            "temporaries": r.temp_bytes,
            "code": r.code_bytes,
            "total": r.total_bytes,
            "host_temporaries": r.host_temp_bytes,
        },
        "model_flops_per_step": r.flops_per_step,
        "xla_flops_per_chip_compiled": r.xla_flops_per_chip,
        "collectives": {k: {"count": n, "bytes": b} for k, (n, b) in r.collectives.items()},
        "peak_bf16_flops_per_chip": r.peak_flops,
        "estimate": None
        if e is None
        else {
            "method": e.method,
            "unavailable": e.unavailable,
            "step_seconds": e.seconds if e.ok else None,
            "optimal_seconds_raw": e.seconds_raw,
            "concat_bitcast_calls": e.concat_bitcasts,
            "tokens_per_s_per_chip": r.tokens_per_s_per_chip if e.ok else None,
            "mfu": r.mfu if e.ok else None,
            "xla_flops_per_chip": e.xla_flops,
            "bytes_accessed_per_chip": e.bytes_accessed,
        },
    }


def format_report(r: CompileReport) -> str:
    """What `jaxlm compile` prints: memory per chip, FLOPs, and where the big arrays live."""
    slices = f"{r.slices} x " if r.slices > 1 else ""
    mesh = " x ".join(f"{a}={s}" for a, s in r.mesh.items())
    lines = [
        f"topology: {slices}{r.topology.name} ({r.topology.libtpu_name}, "
        f"{r.topology.chips * r.slices} chips, {_gib(r.topology.hbm_bytes)} HBM per chip)",
        f"mesh: {mesh}",
        f"parameters: {r.n_params:,}",
        _batch_line(r),
        f"kernels: {', '.join(r.kernels) or 'none (XLA only)'}"
        + (f" ({r.kernel_calls} calls in the compiled step)" if r.kernel_calls else ""),
    ]
    if r.error:
        lines += [
            f"compile: out of memory: {r.error}",
            "memory per chip (estimated: state shards, and the compiler's temporaries):",
            f"  arguments    {_gib(r.argument_bytes)}",
            f"  temporaries  {_gib(r.temp_bytes)}",
            f"  total        {_gib(r.total_bytes)} of {_gib(r.topology.hbm_bytes)}",
        ]
    else:
        lines += [
            "memory per chip:",
            f"  arguments    {_gib(r.argument_bytes)}",
            f"  outputs      {_gib(r.output_bytes - r.alias_bytes)} (not donated)",
            f"  temporaries  {_gib(r.temp_bytes)}",
            f"  code         {_gib(r.code_bytes)}",
            f"  total        {_gib(r.total_bytes)} of {_gib(r.topology.hbm_bytes)} "
            f"({100 * r.total_bytes / r.topology.hbm_bytes:.0f}%)",
        ]
        if r.host_temp_bytes:
            lines.append(
                f"  host memory  {_gib(r.host_temp_bytes)} (offloaded activations; the cost "
                "model prices their copies like HBM copies, so the estimate is optimistic)"
            )
        lines += [
            f"FLOPs per step: {r.flops_per_step:.3e} (6N + attention), "
            f"{r.flops_per_step / (r.topology.chips * r.slices):.3e} per chip; "
            f"XLA counts {r.xla_flops_per_chip:.3e} per chip in this program (a loop body "
            "once: a scanned layer, one microbatch)",
        ]
        lines += _collective_lines(r) + _estimate_lines(r)
    lines.append("largest arrays (global shape, partition spec -> per-chip shard):")
    for a in r.largest:
        lines.append(f"  {a.path:<40} {a.dtype:<8} {a.shape!s:<20} {a.spec} -> {a.shard_shape}")
    lines.append("fits" if r.fits else "DOES NOT FIT")
    return "\n".join(lines)
