"""LoRA adapters alone in the PEFT format, out and in.

`export_peft(RUN_DIR, OUT)` writes `adapter_config.json` and `adapter_model.safetensors`
that `peft.PeftModel.from_pretrained(transformers_model, OUT)` loads onto the
transformers model of the run's base (`jaxlm convert to-hf` gives the merged model
instead). `load_peft_adapter` puts such an adapter onto a jaxlm LoRA model's params
(`lora.init_from=PEFT_DIR` beside `init_from=hf:BASE`).

PEFT's adapter on a module computes (alpha / r) x A^T B^T with `lora_A.weight` (r, in)
and `lora_B.weight` (out, in); jaxlm's is (alpha / r) x A B with A (in..., r) and B
(r, out...), so the tensors are jaxlm's flattened and transposed, the module names are
the architecture's own (its `Link`s: jaxlm/hf/llama.py, gpt2.py). GPT-2 fuses query,
key and value into one `c_attn`: separate rank-r adapters on k of them are exactly one
rank-(k r) adapter on `c_attn` (A stacked, B block-diagonal), written with `rank_pattern`
and `alpha_pattern` so its scale stays alpha / r. A PEFT adapter on `c_attn` of rank r
is, the other way, the same A on query, key and value with B's three row blocks; one of
another rank imports when each projection's rows of B use exactly r of its columns
(jaxlm's own export does), those columns of A and B being its adapter.

Import checks everything before the model is built: names and shapes from the
safetensors header, and for a fused `c_attn` of another rank its B's columns. A
scale differing from `lora.alpha / lora.rank` (another alpha, `alpha_pattern`,
`use_rslora`) is folded into B, so the imported model computes the adapter's function.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxlm.errors import JaxlmError
from jaxlm.hf.links import _paths, _to_host, _unflatten
from jaxlm.model_config import LoraConfig, ModelConfig, lora_targets, projection_dims

__all__ = ["check_peft_adapter", "export_peft", "load_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's prefix of the transformers model's names
TENSOR = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Site:
    """Where jaxlm projection `target` lives in the HF model: module `module` (with `{i}`
    for the layer), part `part` of `parts` equal pieces of its output."""

    target: str
    module: str
    jax: str  # the projection's params path, `{layer}/attn/query`
    part: int
    parts: int
    conv1d: bool  # weights stored (in, out) (GPT-2's Conv1D): PEFT's fan_in_fan_out

    @property
    def short(self) -> str:
        """The module name inside a layer (`self_attn.q_proj`): `target_modules`'."""
        return self.module.split("{i}.", 1)[1]


def sites(m: ModelConfig) -> dict[str, Site]:
    """Every LoRA target of `m`, placed by its architecture's kernel `Link`s."""
    from jaxlm.hf import architecture_of

    m = m.resolved()
    out: dict[str, Site] = {}
    for link in architecture_of(m).links(m):
        parts = link.jax.split("/")
        if link.per_layer and parts[-1] == "kernel" and parts[-2] in lora_targets(m):
            module = link.hf.removesuffix(".weight")
            jax_path = link.jax.removesuffix("/kernel")
            out[parts[-2]] = Site(
                parts[-2], module, jax_path, link.part, link.parts, not link.transpose
            )
    return out


def _layer_path(site: Site, name: str, layer: int, scanned: bool) -> tuple[str, int | None]:
    """(params path of adapter `name`, index in the scanned stack or None) for `layer`."""
    if scanned:
        return f"{site.jax.format(layer='layers')}/{name}", layer
    return f"{site.jax.format(layer=f'layers_{layer}')}/{name}", None


def _grouped(
    targets: list[str] | tuple[str, ...], by_target: dict[str, Site]
) -> dict[str, list[Site]]:
    """The targeted sites by HF module, each module's in output order."""
    groups: dict[str, list[Site]] = {}
    for target in targets:
        site = by_target[target]
        groups.setdefault(site.module, []).append(site)
    return {k: sorted(v, key=lambda s: s.part) for k, v in groups.items()}


def export_peft(path: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Write the adapters of LoRA run `path` as a PEFT adapter directory; returns it.
    `base` is `base_model_name_or_path` (default: the run's `init_from=hf:` directory)."""
    from jaxlm.config import load_config
    from jaxlm.model_dir import CONFIG_FILE, load_model_dir
    from jaxlm.train.init_from import HF_PREFIX

    path, out_dir = Path(path), Path(out_dir)
    if (path / CONFIG_FILE).is_file() and not load_config(path / CONFIG_FILE).lora.rank:
        raise JaxlmError(
            f"{path}: lora.rank is 0, no adapters to export (jaxlm convert to-hf writes the model)"
        )
    _, params, _, config = load_model_dir(path)
    lora, m = config.lora, config.model.resolved()
    if base is None:
        spec = config.init_from
        base = str(Path(spec[len(HF_PREFIX) :]).absolute()) if spec.startswith(HF_PREFIX) else ""
    leaves = _paths(params)
    host: dict[str, np.ndarray] = {}

    def adapter(site: Site, name: str, layer: int) -> np.ndarray:
        key, index = _layer_path(site, name, layer, m.scan_layers)
        if key not in host:
            host[key] = _to_host(leaves[key])
        return host[key] if index is None else host[key][index]

    tensors: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    groups = _grouped(lora.targets, sites(m))
    for module, group in groups.items():
        k = len(group)
        if k > 1:  # separate rank-r adapters = one rank-kr adapter; scale kα / kr = α / r
            rank_pattern[group[0].short] = k * lora.rank
            alpha_pattern[group[0].short] = k * lora.alpha
        for layer in range(m.n_layers):
            a_rows, b_cols = [], []
            for j, site in enumerate(group):
                a = adapter(site, "lora_a", layer)
                b = adapter(site, "lora_b", layer)
                a_rows.append(a.reshape(-1, lora.rank).T)  # (r, in)
                b = b.reshape(lora.rank, -1).T  # (out, r)
                full = np.zeros((b.shape[0] * site.parts, k * lora.rank), b.dtype)
                rows = slice(site.part * b.shape[0], (site.part + 1) * b.shape[0])
                full[rows, j * lora.rank : (j + 1) * lora.rank] = b
                b_cols.append(full)
            name = PREFIX + module.format(i=layer)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(a_rows))
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(sum(b_cols[1:], b_cols[0]))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(site[0].short for site in groups.values()),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(site[0].conv1d for site in groups.values()),
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out_dir


@dataclass(frozen=True)
class _Import:
    """One jaxlm adapter pair to fill: from tensors `a`, `b` (B's row block `part` of
    `parts`), with B times `factor`."""

    site: Site
    layer: int
    a: str
    b: str
    factor: float
    columns: tuple[int, ...] | None = None  # of A's rows / B's columns; None: all


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _plan(directory: str | Path, m: ModelConfig, lora: LoraConfig) -> list[_Import]:
    """What to read from a PEFT adapter directory for `m` with `lora`; every name, shape,
    rank and setting checked from the header, one error naming the first bad one."""
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise JaxlmError(
                f"lora.init_from {directory}: no {file.name} (a PEFT adapter has both)"
            )
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise JaxlmError(f"{config_file}: not JSON ({err})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise JaxlmError(f"{config_file}: peft_type {cfg['peft_type']!r}, jaxlm reads LORA only")
    unsupported = {"bias": cfg.get("bias", "none") != "none", "use_dora": cfg.get("use_dora")}
    unsupported["modules_to_save"] = cfg.get("modules_to_save")
    for key, bad in unsupported.items():
        if bad:
            raise JaxlmError(f"{config_file}: {key} {cfg[key]!r} is not supported by jaxlm")
    m = m.resolved()
    by_target = sites(m)
    by_module: dict[str, tuple[list[Site], int]] = {}
    for site in by_target.values():
        for layer in range(m.n_layers):
            entry = by_module.setdefault(site.module.format(i=layer), ([], layer))
            entry[0].append(site)
    try:
        with safe_open(str(weights_file), framework="numpy") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise JaxlmError(f"{weights_file}: not a readable safetensors file ({err})") from None
    found: dict[str, dict[str, str]] = {}
    known = ", ".join(sorted({s.short for s in by_target.values()}))
    for name in sorted(shapes):
        match = TENSOR.match(name)
        if not match:
            raise JaxlmError(f"{weights_file}: tensor {name} is not a LoRA A/B weight jaxlm reads")
        module, which = match.groups()
        if module not in by_module:
            raise JaxlmError(
                f"{weights_file}: tensor {name} adapts {module}, which jaxlm has no LoRA "
                f"target for ({m.family}: {known})"
            )
        found.setdefault(module, {})[which] = name
    plan: list[_Import] = []
    with safe_open(str(weights_file), framework="numpy") as handle:
        for module, (group, layer) in by_module.items():
            names = found.get(module, {})
            wanted = [s for s in group if s.target in lora.targets]
            if not wanted and not names:
                continue
            if wanted and set(names) != {"A", "B"}:
                raise JaxlmError(
                    f"{weights_file}: no lora_{'B' if 'A' in names else 'A'} for {module} "
                    f"(lora.targets lists {wanted[0].target!r})"
                )
            tensor = names.get("A") or names["B"]
            if not wanted:
                raise _unlisted(weights_file, tensor, group[0].target, lora)
            a_shape, b_shape = shapes[names["A"]], shapes[names["B"]]
            d_in, d_out = projection_dims(m, group[0].target)
            rank = a_shape[0]
            expected = ((rank, d_in), (d_out * group[0].parts, rank))
            if (a_shape, b_shape) != expected:
                raise JaxlmError(
                    f"{weights_file}: {module}'s lora_A, lora_B are {a_shape}, {b_shape}; the "
                    f"model's {group[0].target!r} needs {expected[0]}, {expected[1]}"
                )
            columns = _columns(handle, names["B"], group, wanted, rank, lora.rank)
            if isinstance(columns, str):
                raise _unlisted(weights_file, tensor, columns, lora)
            if columns is None and rank != lora.rank:
                raise JaxlmError(
                    f"{weights_file}: {module} has rank {rank}, lora.rank is {lora.rank}"
                )
            alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            scale = float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
            for site in wanted:
                cols = columns[site.target] if columns else None
                plan.append(_Import(site, layer, names["A"], names["B"], scale / lora.scale, cols))
    return plan


def _unlisted(weights_file: Path, tensor: str, target: str, lora: LoraConfig) -> JaxlmError:
    return JaxlmError(
        f"{weights_file}: tensor {tensor} adapts jaxlm's {target!r}, which lora.targets "
        f"does not list ({', '.join(lora.targets)})"
    )


def _columns(
    handle: Any, b_name: str, group: list[Site], wanted: list[Site], rank: int, lora_rank: int
) -> dict[str, tuple[int, ...]] | str | None:
    """For a module fused from several projections (GPT-2's c_attn) whose adapter is not
    simply rank `lora_rank` on all of them: the columns of A / B each wanted projection
    uses (its B rows' non-zero columns, exactly `lora_rank` of them), or the name of a
    projection with non-zero rows that `lora.targets` leaves out. None: all columns (or,
    unfused, a rank the caller refuses)."""
    if group[0].parts == 1 or (rank == lora_rank and len(wanted) == len(group)):
        return None
    b = handle.get_tensor(b_name)
    width = b.shape[0] // group[0].parts
    out: dict[str, tuple[int, ...]] = {}
    for site in group:
        used = np.flatnonzero(np.any(b[site.part * width : (site.part + 1) * width] != 0, 0))
        if site not in wanted:
            if used.size:
                return site.target
        elif rank != lora_rank:
            if used.size != lora_rank:
                return None
            out[site.target] = tuple(int(c) for c in used)
    return out or None


def check_peft_adapter(directory: str | Path, m: ModelConfig, lora: LoraConfig) -> None:
    """Refuse a PEFT adapter directory that does not fit `m` with `lora`, reading its
    config, the safetensors header and (GPT-2's fused c_attn only) B."""
    _plan(directory, m, lora)


def load_peft_adapter(directory: str | Path, m: ModelConfig, lora: LoraConfig, params: Any) -> Any:
    """`params` (a LoRA model's, on their shardings) with the adapters of a PEFT
    directory in place of theirs; the base weights are kept."""
    import jax

    plan = _plan(directory, m, lora)
    leaves = _paths(params)
    scanned = m.resolved().scan_layers
    host: dict[str, np.ndarray] = {}
    with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), framework="numpy") as handle:
        for item in plan:
            a_key, index = _layer_path(item.site, "lora_a", item.layer, scanned)
            b_key, _ = _layer_path(item.site, "lora_b", item.layer, scanned)
            for key in (a_key, b_key):
                if key not in host:
                    host[key] = np.zeros(leaves[key].shape, leaves[key].dtype)
            a = handle.get_tensor(item.a).astype(np.float32)  # (r, in)
            b = handle.get_tensor(item.b).astype(np.float32)  # (out * parts, r)
            width = b.shape[0] // item.site.parts
            b = b[item.site.part * width : (item.site.part + 1) * width] * item.factor
            if item.columns is not None:
                a, b = a[list(item.columns)], b[:, list(item.columns)]
            a_shape = host[a_key].shape[1:] if index is not None else host[a_key].shape
            b_shape = host[b_key].shape[1:] if index is not None else host[b_key].shape
            a_value, b_value = a.T.reshape(a_shape), b.T.reshape(b_shape)
            if index is None:
                host[a_key][...], host[b_key][...] = a_value, b_value
            else:
                host[a_key][index], host[b_key][index] = a_value, b_value
    placed = {k: jax.device_put(v, leaves[k].sharding) for k, v in host.items()}
    return _unflatten(params, {**leaves, **placed})
