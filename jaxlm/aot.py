"""Ahead-of-time compile of the full train step for a Cloud TPU topology, on any machine.

libtpu (the `tpu` extra) describes a TPU slice without the hardware: its devices
compile real TPU programs, so per-chip memory, FLOPs and the layout of every array
can be known before a pod is rented. The model, state, shardings and jitted step are
the trainer's own (`jaxlm.train.step.train_steps`, the model built for the topology's
platform), so what compiles here is what would run there.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import jax

from jaxlm import sharding as shd
from jaxlm.aot_estimate import (
    PEAK_BF16_TFLOPS,
    StepEstimate,
    estimate_from_compiled,
    summarize_hlo,
)
from jaxlm.config import Config
from jaxlm.errors import JaxlmError

GIB = 1024**3

# Generation -> (libtpu name, TensorCores per chip in Cloud accelerator names, HBM per chip,
# physical dimensions of a slice). v4/v5p names count TensorCores (2 per chip).
GENERATIONS: dict[str, tuple[str, int, int, int]] = {
    "v4": ("v4", 2, 32 * GIB, 3),
    "v5e": ("v5e", 1, 16 * GIB, 2),
    "v5litepod": ("v5e", 1, 16 * GIB, 2),
    "v5p": ("v5p", 2, 95 * GIB, 3),
    "v6e": ("v6e", 1, 32 * GIB, 2),
}


@dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice: `v5p-128` (accelerator type) or `v5e-2x2` (chip grid)."""

    name: str
    generation: str
    shape: tuple[int, ...]
    hbm_bytes: int

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.shape))}"


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape for a power-of-two chip count: 2x4, 4x4x8, 2x2x1."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError
    shape = [1] * dims
    for i in range(chips.bit_length() - 1):
        shape[i % dims] *= 2
    grown = sorted(s for s in shape if s > 1)
    return (*grown, *([1] * (dims - len(grown))))


def parse_topology(name: str) -> Topology:
    match = re.fullmatch(r"(v\w+?)[-:]([0-9x]+)", name.strip())
    if not match or match.group(1) not in GENERATIONS:
        raise JaxlmError(
            f"--topology {name!r}: expected e.g. v5p-128, v5e-16 or v5e-2x2; "
            f"generations: {', '.join(GENERATIONS)}"
        )
    generation, size = match.groups()
    _, cores_per_chip, hbm, dims = GENERATIONS[generation]
    try:
        if "x" in size:
            shape = tuple(int(s) for s in size.split("x"))
            if len(shape) != dims:
                raise ValueError
        else:
            cores = int(size)
            if cores % cores_per_chip:
                raise ValueError
            shape = _grid(cores // cores_per_chip, dims)
    except ValueError:
        raise JaxlmError(
            f"--topology {name!r}: {generation} slices are {dims}-D grids of chips "
            f"(e.g. {generation}-{'x'.join(['2'] * dims)}) or a power-of-two size"
        ) from None
    return Topology(name, generation, shape, hbm)


def topology_devices(topology: Topology, slices: int = 1) -> list[Any]:
    """Compile-only TPU devices from libtpu; no TPU (and no lock on one) is needed."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # trainers may hold the lock
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise JaxlmError(
            "jaxlm compile needs libtpu: pip install -e '.[tpu]' (no TPU is needed)"
        ) from None
    from jax.experimental import topologies

    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.libtpu_name, **kwargs
        )
    except Exception as err:  # libtpu reports unknown shapes as several error types
        raise JaxlmError(f"--topology {topology.name!r}: libtpu refused it: {err}") from None
    return list(desc.devices)


@dataclass
class ArrayLayout:
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str
    shard_shape: tuple[int, ...]
    shard_bytes: int


@dataclass
class CompileReport:
    topology: Topology
    slices: int
    mesh: dict[str, int]
    n_params: int
    batch_size: int = 0  # rows per step (train.batch_size)
    seq_len: int = 0
    grad_accum: int = 1  # microbatches per step (train.grad_accum)
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    # Host memory the step's temporaries take per chip: activations model.remat_offload
    # moves there. XLA's cost model prices those copies like HBM copies.
    host_temp_bytes: int = 0
    flops_per_step: float = 0.0  # 6N + attention per token (as for MFU), whole step
    xla_flops_per_chip: float = 0.0  # the compiler's count: a scanned layer loop counts once
    largest: list[ArrayLayout] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # Pallas/Mosaic kernels in the step
    # Kernel calls in the compiled step (a scanned layer loop's body counts once): shows
    # what remat reruns, e.g. splash's forward twice a layer unless "context" is saved.
    kernel_calls: int = 0
    error: str = ""  # the compiler's out-of-memory message, when it gave up
    # (count, bytes per chip) per collective kind in one step of the compiled program
    collectives: dict[str, tuple[int, int]] = field(default_factory=dict)
    estimate: StepEstimate | None = None  # the cost model's whole-step figures

    @property
    def chips(self) -> int:
        return self.topology.chips * self.slices

    @property
    def peak_flops(self) -> float:
        """Dense bf16 peak of one chip, FLOP/s."""
        return PEAK_BF16_TFLOPS[GENERATIONS[self.topology.generation][0]] * 1e12

    @property
    def tokens_per_s_per_chip(self) -> float:
        e = self.estimate
        if not e or not e.ok:
            return 0.0
        return self.batch_size * self.seq_len / self.chips / e.seconds

    @property
    def mfu(self) -> float:
        """Model FLOPs (training's MFU formula) per chip over (estimated time x peak)."""
        e = self.estimate
        if not e or not e.ok:
            return 0.0
        return self.flops_per_step / self.chips / (e.seconds * self.peak_flops)

    @property
    def total_bytes(self) -> int:
        """Live at the peak: arguments, outputs not aliased to donated inputs, temporaries."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return not self.error and self.total_bytes <= self.topology.hbm_bytes


def _shard_bytes(tree: Any) -> int:
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree_util.tree_leaves(tree)
    )


def _layouts(abstract: Any, top: int) -> list[ArrayLayout]:
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    out = []
    for path, leaf in leaves:
        shard = tuple(leaf.sharding.shard_shape(leaf.shape))
        out.append(
            ArrayLayout(
                path=shd._path_name(path),
                shape=tuple(leaf.shape),
                dtype=str(leaf.dtype),
                spec=str(tuple(leaf.sharding.spec)),
                shard_shape=shard,
                shard_bytes=math.prod(shard) * leaf.dtype.itemsize,
            )
        )
    return sorted(out, key=lambda a: -math.prod(a.shape))[:top]


# Compiler flags of the estimate compile only: on v5e XLA turns FSDP gathers and gradient
# reduce-scatters into windowed-einsum loops, whose bodies the cost model counts once.
ESTIMATE_COMPILER_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def _lower(config: Config, mesh: Any, rules: Any) -> tuple[Any, Any, Any]:
    """The trainer's jitted step, lowered for abstract state and batch on `mesh`."""
    from jaxlm.train.objectives import for_model
    from jaxlm.train.step import batch_shardings, train_steps

    t_cfg = config.train
    _, abstract, _, _, (step, _) = train_steps(config, mesh, rules)
    objective = for_model(config.model)
    in_batch = batch_shardings(mesh, rules, objective.batch_ranks)
    shapes = objective.batch_shapes(t_cfg.batch_size, t_cfg.seq_len, config.data.target_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, "int32", sharding=in_batch[k]) for k, shape in shapes.items()
    }
    return step.lower(abstract, batch), abstract, batch


def _unrolled_estimate(config: Config, mesh: Any, rules: Any, how: str) -> StepEstimate:
    """The cost model's figures for `config` compiled with its layers unrolled and one
    microbatch, scaled to the step (see `_estimate`)."""
    accum = config.train.grad_accum
    flat = config.replace(
        model={"scan_layers": False},
        train={"grad_accum": 1, "batch_size": config.train.batch_size // accum},
    )
    lowered, _, _ = _lower(flat, mesh, rules)
    try:
        again = lowered.compile(ESTIMATE_COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError as err:
        first = str(err).splitlines()[0][:200]
        return StepEstimate(method=how, unavailable=f"the unrolled compile failed: {first}")
    return estimate_from_compiled(again, how, scale=accum)


EXTRAPOLATE_FROM = (2, 4)  # layer counts compiled when the whole unrolled step is too big


def _extrapolated_estimate(config: Config, mesh: Any, rules: Any, how: str) -> StepEstimate:
    """Unrolled layers are alike, so a step's cost is a + b x layers: compile 2 and 4
    layers and extend the line to n_layers. For a step whose unrolled program does not
    fit (XLA schedules it differently from the scanned one that does). Checked on v5p
    (7B: within 0.01% of the 32-layer compile); v5e's cost model prices a layer of a
    short program higher than one of the whole step (1B: +14% at 22 layers), so there
    the method says it overestimates."""
    m = config.model
    if m.n_decoder_layers not in (0, m.n_layers) or m.n_layers <= max(EXTRAPOLATE_FROM):
        return StepEstimate(method=how, unavailable="the unrolled compile does not fit")
    lo, hi = (
        _unrolled_estimate(config.replace(model={"n_layers": n}), mesh, rules, how)
        for n in EXTRAPOLATE_FROM
    )
    if not (lo.ok and hi.ok):
        return lo if not lo.ok else hi
    est = StepEstimate(method=how)
    (a, b), n = EXTRAPOLATE_FROM, m.n_layers
    for name in ("seconds", "seconds_raw", "concat_bitcasts", "xla_flops", "bytes_accessed"):
        x, y = getattr(lo, name), getattr(hi, name)
        setattr(est, name, type(x)(x + (y - x) * (n - a) / (b - a)))
    return est


def _estimate(
    config: Config, compiled: Any, loops: list[int | None], mesh: Any, rules: Any
) -> StepEstimate:
    """Whole-step cost figures. XLA counts a loop body once, so a program with loops (a
    scanned layer stack, gradient accumulation, windowed einsums) is compiled again
    without them: layers unrolled (model.scan_layers=false), one microbatch of
    batch/grad_accum rows whose cost is multiplied by grad_accum (the optimizer update is
    then counted grad_accum times), and windowed einsums off. Where that program does
    not fit, 2 and 4 unrolled layers are compiled and extrapolated."""
    if not any(t != 1 for t in loops):
        how = "the compiled program itself (no loops)"
        return estimate_from_compiled(compiled, how, loops=loops)
    accum = config.train.grad_accum
    how = "a second compile with layers unrolled (model.scan_layers=false), windowed einsums off"
    if accum > 1:
        how += f", one microbatch x {accum}"
    est = _unrolled_estimate(config, mesh, rules, how)
    if "RESOURCE_EXHAUSTED" not in est.unavailable:
        return est
    lo, hi = EXTRAPOLATE_FROM
    how = how.replace("a second compile", f"compiles of {lo} and {hi} layers") + (
        f", extrapolated to {config.model.n_layers} (all of them unrolled do not fit)"
    )
    if "v5 lite" in mesh.devices.flat[0].device_kind.lower():  # v5e: _extrapolated_estimate
        how += "; on v5e this overestimates (1B: +14%)"
    return _extrapolated_estimate(config, mesh, rules, how)


def compile_train_step(
    config: Config, topology: Topology, slices: int = 1, top: int = 6, estimate: bool = False
) -> CompileReport:
    """Lower and compile one train step of `config` for `slices` x `topology`; with
    `estimate`, also the cost model's whole-step time (may cost a second compile)."""
    from jaxlm.model_config import flops_per_token
    from jaxlm.train.state import count_params

    if config.model.vocab_size == 0:  # no tokenizer here: it will have exactly this many
        config = config.replace(model={"vocab_size": config.tokenizer.vocab_size})
    t_cfg = config.train
    devices = topology_devices(topology, slices)
    mesh = shd.make_mesh(config.mesh, devices)
    rules = shd.logical_rules(config.mesh)
    data = shd.batch_sharding(mesh, rules)
    shd.check_batch(t_cfg.batch_size, data, t_cfg.seq_len, t_cfg.grad_accum)

    lowered, abstract, batch = _lower(config, mesh, rules)
    report = CompileReport(
        topology=topology,
        slices=slices,
        mesh=dict(mesh.shape),
        n_params=count_params(abstract.params),
        batch_size=t_cfg.batch_size,
        seq_len=t_cfg.seq_len,
        grad_accum=t_cfg.grad_accum,
        largest=_layouts(abstract, top),
    )
    tokens = t_cfg.batch_size * t_cfg.seq_len
    report.flops_per_step = flops_per_token(config.model, report.n_params, t_cfg.seq_len) * tokens
    report.kernels = sorted(set(re.findall(r'kernel_name = "([^"]+)"', lowered.as_text())))
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        # Only the compiler's out-of-memory status means "does not fit"; other errors
        # (a kernel that fails to lower, say) may mention memory and are real failures.
        if not str(err).startswith("RESOURCE_EXHAUSTED"):
            raise
        report.error = str(err).splitlines()[0][:500]
        # Still say how far off it is: the state's shards, and the compiler's temporaries.
        report.argument_bytes = _shard_bytes((abstract, batch))
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", report.error)
        report.temp_bytes = int(float(needed.group(1)) * GIB) if needed else 0
        return report
    if report.kernels:
        report.kernel_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    mem = compiled.memory_analysis()
    report.argument_bytes = mem.argument_size_in_bytes
    report.output_bytes = mem.output_size_in_bytes
    report.alias_bytes = mem.alias_size_in_bytes
    report.temp_bytes = mem.temp_size_in_bytes
    report.code_bytes = mem.generated_code_size_in_bytes
    report.host_temp_bytes = getattr(mem, "host_temp_size_in_bytes", 0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report.xla_flops_per_chip = float(cost.get("flops", 0.0)) if cost else 0.0
    summary = summarize_hlo(compiled.as_text())
    report.collectives = summary.collectives
    if estimate:
        report.estimate = _estimate(config, compiled, summary.loops, mesh, rules)
    return report
