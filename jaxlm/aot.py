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
    flops_per_step: float = 0.0  # 6N + attention per token (as for MFU), whole step
    xla_flops_per_chip: float = 0.0  # the compiler's count: a scanned layer loop counts once
    largest: list[ArrayLayout] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # Pallas/Mosaic kernels in the step
    error: str = ""  # the compiler's out-of-memory message, when it gave up

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


def compile_train_step(
    config: Config, topology: Topology, slices: int = 1, top: int = 6
) -> CompileReport:
    """Lower and compile one train step of `config` for `slices` x `topology`."""
    from jaxlm.model_config import flops_per_token
    from jaxlm.train.objectives import for_family
    from jaxlm.train.state import count_params
    from jaxlm.train.step import batch_shardings, train_steps

    if config.model.vocab_size == 0:  # no tokenizer here: it will have exactly this many
        config = config.replace(model={"vocab_size": config.tokenizer.vocab_size})
    t_cfg = config.train
    devices = topology_devices(topology, slices)
    mesh = shd.make_mesh(config.mesh, devices)
    rules = shd.logical_rules(config.mesh)
    data = shd.batch_sharding(mesh, rules)
    shd.check_batch(t_cfg.batch_size, data, t_cfg.seq_len, t_cfg.grad_accum)

    _, abstract, _, _, (step, _) = train_steps(config, mesh, rules)
    objective = for_family(config.model.family)
    in_batch = batch_shardings(mesh, rules, objective.batch_ranks)
    shapes = objective.batch_shapes(t_cfg.batch_size, t_cfg.seq_len, config.data.target_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, "int32", sharding=in_batch[k]) for k, shape in shapes.items()
    }
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
    lowered = step.lower(abstract, batch)
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
    mem = compiled.memory_analysis()
    report.argument_bytes = mem.argument_size_in_bytes
    report.output_bytes = mem.output_size_in_bytes
    report.alias_bytes = mem.alias_size_in_bytes
    report.temp_bytes = mem.temp_size_in_bytes
    report.code_bytes = mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report.xla_flops_per_chip = float(cost.get("flops", 0.0)) if cost else 0.0
    return report


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
        f"kernels: {', '.join(r.kernels) or 'none (XLA only)'}",
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
            f"FLOPs per step: {r.flops_per_step:.3e} (6N + attention), "
            f"{r.flops_per_step / (r.topology.chips * r.slices):.3e} per chip; "
            f"XLA counts {r.xla_flops_per_chip:.3e} per chip (a scanned layer once"
            + (f", one of the {r.grad_accum} microbatches)" if r.grad_accum > 1 else ")"),
        ]
    lines.append("largest arrays (global shape, partition spec -> per-chip shard):")
    for a in r.largest:
        lines.append(f"  {a.path:<40} {a.dtype:<8} {a.shape!s:<20} {a.spec} -> {a.shard_shape}")
    lines.append("fits" if r.fits else "DOES NOT FIT")
    return "\n".join(lines)
