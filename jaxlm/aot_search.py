"""`jaxlm compile --search`: compile the setups that matter, rank them by the compiler's
estimated tokens/s/chip among those that fit.

Which remat policy, per-chip batch, gradient accumulation and mesh strategy is fastest
on a topology is a question the TPU compiler answers without a TPU (`jaxlm.aot`), one
compile (two for a scanned step) per setup. The search is bounded: candidates run in a
fixed order until a time budget is spent, and each result is cached on disk under a
hash of the full resolved config, the topology and the versions that compile it, so a
rerun (or a wider search) only compiles what is new.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxlm.aot import Topology, compile_train_step
from jaxlm.aot_report import report_json
from jaxlm.config import Config, load_config, to_yaml
from jaxlm.errors import JaxlmError
from jaxlm.train import xla_options

# Mesh strategies by name: the overrides that select them.
MESHES = {
    "fsdp": ("mesh.data=1", "mesh.fsdp=-1", "mesh.strategy=fsdp"),
    "data": ("mesh.data=-1", "mesh.fsdp=1", "mesh.strategy=data"),
    "config": (),  # the config's own mesh
}
DEFAULT_SPACE = {
    "model.remat": ["none", "minimal_with_context", "minimal", "dots", "qkv_with_context", "full"],
    "mesh": ["fsdp", "data"],
}


def parse_space(words: list[str], chips: int, batch_size: int) -> dict[str, list[str]]:
    """`KEY=V1,V2` words -> the search grid. `batch` is rows per chip, `mesh` a name of
    MESHES; any other key is a config override. Unnamed keys keep the defaults: remat
    none/dots/full, meshes fsdp and data, the config's own per-chip batch."""
    space = {k: list(v) for k, v in DEFAULT_SPACE.items()}
    space["batch"] = [str(max(1, batch_size // chips))]
    for word in words:
        key, sep, values = word.partition("=")
        choices = [v for v in values.split(",") if v]
        if not sep or not key or not choices:
            raise JaxlmError(f"--space {word!r}: expected KEY=V1,V2 (e.g. model.remat=none,full)")
        if key == "mesh" and (bad := [v for v in choices if v not in MESHES]):
            known = ", ".join(MESHES)
            raise JaxlmError(f"--space {word!r}: unknown mesh {bad[0]!r}; known: {known}")
        if key == "batch" and not all(v.isdigit() and int(v) > 0 for v in choices):
            raise JaxlmError(f"--space {word!r}: batch takes positive rows per chip")
        space[key] = choices
    return space


def candidates(space: dict[str, list[str]], chips: int) -> list[list[str]]:
    """Every combination of the grid as config overrides (batch -> train.batch_size)."""
    keys = list(space)
    out = []
    for values in itertools.product(*(space[k] for k in keys)):
        words: list[str] = []
        for key, value in zip(keys, values, strict=True):
            if key == "batch":
                words.append(f"train.batch_size={int(value) * chips}")
            elif key == "mesh":
                words.extend(MESHES[value])
            else:
                words.append(f"{key}={value}")
        out.append(words)
    return out


# Bumped when what jaxlm compiles, or reads from a compile, changes under the same
# package versions (compile options, the HLO reader), so older records are not reused.
RECORD_VERSION = 2


def cache_key(config: Config, topology: Topology, slices: int) -> str:
    """What decides the compiled program: the resolved config, the slice, the compilers,
    TPU compile options and the record's version."""
    versions = [f"record={RECORD_VERSION}", f"options={sorted(xla_options.TPU.items())}"]
    for package in ("jaxlm", "jax", "jaxlib", "libtpu", "flax"):
        try:
            versions.append(f"{package}={md.version(package)}")
        except md.PackageNotFoundError:
            versions.append(f"{package}=-")
    text = "\n".join([to_yaml(config), topology.libtpu_name, str(slices), *versions])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    root = Path(os.environ.get("JAXLM_CACHE_DIR", Path.home() / ".cache" / "jaxlm"))
    return root / "aot_search"


def cache_path(
    config: Config, topology: Topology, slices: int = 1, cache_dir: Path | None = None
) -> Path:
    """Where the compile record of `config` on `slices` x `topology` is kept."""
    return (cache_dir or default_cache_dir()) / f"{cache_key(config, topology, slices)}.json"


# Memory left free for a setup to count as fitting: the compiler's figure is for one
# program, and a run also holds the input pipeline's device buffers, a checkpoint's
# copies and the allocator's fragmentation. A setup closer to full than this is "tight".
HEADROOM = 0.1


def fit_class(record: dict[str, Any]) -> int:
    """0: fits with HEADROOM of HBM to spare; 1: fits, tight; 2: does not fit."""
    if not record.get("fits"):
        return 2
    hbm = record.get("hbm_bytes") or 0
    total = record.get("memory_bytes", {}).get("total", 0)
    return 1 if hbm and total > (1 - HEADROOM) * hbm else 0


def _rank(record: dict[str, Any]) -> tuple:
    """Fits with headroom first, then tight fits; then estimated tokens/s/chip (unknown
    last); then less memory; the candidates the budget left out last."""
    if not record:
        return (3, 1, 0.0, 0)
    est = record.get("estimate") or {}
    speed = est.get("tokens_per_s_per_chip") or 0.0
    total = record.get("memory_bytes", {}).get("total", 0)
    return (fit_class(record), 0, -speed, total)


def search(
    config_path: str | None,
    overrides: list[str],
    topology: Topology,
    space_words: list[str],
    budget_s: float,
    slices: int = 1,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[tuple[list[str], dict[str, Any]]]:
    """Compile the grid's candidates (cached ones are free) until `budget_s` is spent;
    returns (overrides, report record) pairs, best first. Every candidate's config is
    built and checked before the first compile, so bad input fails at once."""
    base = load_config(config_path, overrides)
    chips = topology.chips * slices
    space = parse_space(space_words, chips, base.train.batch_size)
    grid = [(w, load_config(config_path, [*overrides, *w])) for w in candidates(space, chips)]
    start, results = time.monotonic(), []
    for i, (words, config) in enumerate(grid):
        path = cache_path(config, topology, slices, cache_dir)
        if path.exists():
            results.append((words, json.loads(path.read_text())))
            log(f"[{i + 1}/{len(grid)}] cached: {' '.join(words)}")
            continue
        spent = time.monotonic() - start
        if spent >= budget_s:
            log(f"[{i + 1}/{len(grid)}] skipped: budget of {budget_s:g} s spent: {' '.join(words)}")
            results.append((words, {}))
            continue
        log(f"[{i + 1}/{len(grid)}] compiling: {' '.join(words)}")
        try:
            record = report_json(compile_train_step(config, topology, slices, estimate=True))
        except JaxlmError as err:  # a candidate the mesh cannot hold (batch, say)
            record = {"fits": False, "error": str(err), "estimate": None}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        results.append((words, record))
    return rank(results)


def rank(results: list[tuple[list[str], dict[str, Any]]]) -> list[tuple[list[str], dict]]:
    """Best first: fits with headroom, then tight; then estimated tokens/s/chip (unknown
    last), then less memory."""
    return sorted(results, key=lambda wr: _rank(wr[1]))


def format_search(results: list[tuple[list[str], dict[str, Any]]], hbm_bytes: int) -> str:
    """The ranked table, then the overrides of the best candidate that fits."""
    gib = 1024**3
    lines = [
        "ranked by the compiler's estimated tokens/s/chip (libtpu's cost model, not a "
        "measurement; it leaves out Pallas kernels such as splash attention, so a setup "
        "with fewer kernel calls is faster than it shows); memory per chip from the "
        "compiled program:",
        f"{'#':>3}  {'fits':<5}  {'GiB/chip':>8}  {'est. s/step':>11}  {'tok/s/chip':>10}  "
        f"{'MFU':>6}  {'kernels':>7}  overrides",
    ]
    for n, (words, r) in enumerate(results, 1):
        est = r.get("estimate") or {}
        total = r.get("memory_bytes", {}).get("total", 0)
        if est.get("step_seconds"):
            time_s = f"{est['step_seconds']:>11.4g}  {est['tokens_per_s_per_chip']:>10,.0f}  "
            time_s += f"{100 * est['mfu']:>5.1f}%"
        else:
            why = est.get("unavailable") or (r.get("error") or "no estimate")[:60]
            time_s = f"{'-':>11}  {'-':>10}  {'-':>6}  ({why})"
        fits = ("yes", "tight", "no")[fit_class(r)] if r else "?"
        if not r:
            time_s = f"{'-':>11}  {'-':>10}  {'-':>6}  (not compiled: budget spent)"
        calls = f"{r.get('kernel_calls') or '-':>7}"  # a scanned program: a layer's calls
        lines.append(
            f"{n:>3}  {fits:<5}  {total / gib:>8.2f}  {time_s}  {calls}  {' '.join(words)}"
        )
    best = next((w for w, r in results if r and fit_class(r) == 0), None)
    tight = next((w for w, r in results if r and fit_class(r) == 1), None)
    if best is None and tight is None:
        lines.append(f"no candidate fits in {hbm_bytes / gib:.0f} GiB per chip")
    elif best is None:
        lines.append(f"best (tight: under {100 * HEADROOM:.0f}% of HBM free): {' '.join(tight)}")
    else:
        lines.append(f"best: {' '.join(best)}")
    return "\n".join(lines)
