"""What a config's model costs, before anything is built: parameters and FLOPs per token.

Shapes come from `jax.eval_shape` of `model.init`, so a 70B preset is counted in well
under a second with no memory. FLOPs per token are the family's
(`jaxlm.model_config.flops_per_token`), so `jaxlm info` and the MFU a run logs agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlm.config import Config, ModelConfig
from jaxlm.model_config import FAMILIES, flops_per_token
from jaxlm.train.state import param_shapes


@dataclass(frozen=True)
class ModelInfo:
    model: ModelConfig  # resolved, with the vocab size the trainer would use
    n_params: int
    groups: dict[str, int]  # parameters per top-level module (blocks summed as "layers")
    components: dict[str, int]  # parameters per kind: embeddings, attention, mlp, norms, heads
    seq_len: int
    flops_per_token: float


def count_params(model_config: ModelConfig) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(param_shapes(model_config)))


def _vocab_size(config: Config) -> int:
    """The size the trainer would use: model.vocab_size, or else the tokenizer's."""
    if config.model.vocab_size:
        return config.model.vocab_size
    if config.tokenizer.path:
        from jaxlm.data.tokenizer import load_tokenizer

        return load_tokenizer(config.tokenizer.path).get_piece_size()
    return config.tokenizer.vocab_size


def component(module_path: tuple[str, ...]) -> str:
    """What kind of part a parameter's modules (outermost first) make it, by the names
    every family uses: ln_* norms, *attn (and T5's relpos bias), mlp, *embed; the rest
    (LM head, pooler, MLM and NSP heads) are heads."""
    if any(part.startswith("ln") for part in module_path):
        return "norms"
    if any("attn" in part or part == "relpos" for part in module_path):
        return "attention"
    if "mlp" in module_path:
        return "mlp"
    if any(part.endswith("embed") for part in module_path):
        return "embeddings"
    return "heads"


def model_info(config: Config) -> ModelInfo:
    model = dataclasses.replace(config.model.resolved(), vocab_size=_vocab_size(config))
    groups: dict[str, int] = {}
    components = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "heads"), 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(model))[0]:
        names = tuple(str(getattr(k, "key", k)) for k in path)
        group = "layers" if names[0].startswith("layers") else names[0]
        groups[group] = groups.get(group, 0) + int(leaf.size)
        components[component(names[:-1])] += int(leaf.size)
    n_params = sum(groups.values())
    seq_len = config.train.seq_len
    flops = flops_per_token(model, n_params, seq_len)
    return ModelInfo(model, n_params, groups, components, seq_len, flops)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def describe(m: ModelConfig) -> str:
    """One line naming every architecture choice, so two presets compare at a glance."""
    kv = f" ({m.kv_heads} kv)" if m.kv_heads != m.n_heads else ""
    position = f"rope (base {m.rope_base:g})" if m.position == "rope" else "learned positions"
    if m.position == "relative":  # T5's bucketed bias
        position = (
            f"relative bias ({m.relative_buckets} buckets, max distance {m.relative_max_distance})"
        )
    kind = FAMILIES[m.family].kind
    decoder_layers = f"+{m.n_decoder_layers or m.n_layers}" if kind == "encoder_decoder" else ""
    stack = f"{kind.replace('_', '-')}: {m.n_layers}{decoder_layers} layers"
    parts = [
        f"{m.family} {stack}, d_model {m.d_model}",
        f"{m.n_heads} heads{kv} of {m.head_dim}",
        f"{m.mlp} d_ff {m.ff_dim}",
        f"{m.norm} (eps {m.layer_norm_eps:g})",
        position,
        f"vocab {m.vocab_size} ({'tied' if m.tie_embeddings else 'untied'})",
        f"max_len {m.max_len}",
        "biases" if m.use_bias else "no biases",
    ]
    if m.sliding_window:
        parts.append(f"sliding window {m.sliding_window}")
    return ", ".join(parts)


def format_info(name: str, info: ModelInfo) -> str:
    """What `jaxlm info` prints. AdamW keeps two moments per parameter in the
    parameters' dtype, so its state is twice the parameters' bytes."""
    param_gib = info.n_params * jnp.dtype(info.model.param_dtype).itemsize / 2**30
    lines = [
        f"{name}: {describe(info.model)}",
        f"parameters:      {info.n_params:>17,}  ({_human(info.n_params)})",
        *(f"  {group + ':':<15}{n:>17,}" for group, n in info.groups.items()),
        "by kind:",
        *(f"  {kind + ':':<15}{n:>17,}" for kind, n in info.components.items() if n),
        f"parameter bytes: {param_gib:>17.2f} GiB ({info.model.param_dtype})",
        f"AdamW state:     {2 * param_gib:>17.2f} GiB (two moments, {info.model.param_dtype})",
        f"training FLOPs per token: {info.flops_per_token:,.0f} ({_human(info.flops_per_token)}) "
        f"at seq_len {info.seq_len}",
        "  = 6 N + 12 L d_attn T, N without lookup-only tables (PaLM, App. B)",
    ]
    return "\n".join(lines)
