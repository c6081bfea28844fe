"""`jaxlm attention`: a model's attention probabilities over a text, per layer and head.

The models sow them into flax's `intermediates` collection when it is mutable (and
only then: training and generation never compute them), from the reference einsum
whichever attention implementation runs. Maps are grouped by where the attention sits:
`attn` (decoders, BERT), or `encoder/self_attn`, `decoder/self_attn` and
`decoder/cross_attn` (T5, fed the text as both source and target).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure

from jaxlm.errors import JaxlmError
from jaxlm.model_config import FAMILIES


def _ids(pretrained: Any, text: str) -> list[int]:
    tokenizer, config = pretrained.tokenizer, pretrained.config
    ids = [tokenizer.bos_id(), *tokenizer.encode(text)]
    if FAMILIES[config.model.family].kind == "encoder":  # [CLS] text [SEP]
        ids.append(tokenizer.eos_id())
    if len(ids) > config.model.max_len:
        raise JaxlmError(f"{len(ids)} tokens exceed the model's max_len {config.model.max_len}")
    return ids


def collect_maps(intermediates: Any) -> dict[str, np.ndarray]:
    """{group: (layers, heads, T, S)} of the first row from a model's `intermediates`."""
    layers: dict[str, dict[int, np.ndarray]] = {}
    for path, value in traverse_util.flatten_dict(intermediates).items():
        if path[-1] != "attention":
            continue
        names = [p for p in path[:-1] if not re.fullmatch(r"layers(_\d+)?", p)]
        index = next((int(p[7:]) for p in path if re.fullmatch(r"layers_\d+", p)), None)
        array = np.asarray(value[0], np.float32)
        group = layers.setdefault("/".join(names), {})
        if index is None:  # scanned: a leading layers axis
            group.update(enumerate(array[:, 0]))
        else:
            group[index] = array[0]
    return {g: np.stack([m[i] for i in sorted(m)]) for g, m in layers.items()}


def attention_maps(pretrained: Any, text: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """The text's pieces and its attention maps by group, each (layers, heads, T, T)."""
    model, params, tokenizer, _ = pretrained
    ids = _ids(pretrained, text)
    _, state = model.apply(
        {"params": params}, np.asarray([ids], np.int32), mutable=["intermediates"]
    )
    return [tokenizer.id_to_piece(i) for i in ids], collect_maps(state["intermediates"])


def pick(maps: dict[str, np.ndarray], group: str | None, layer: int, head: int) -> np.ndarray:
    """One (T, S) map; an unknown group, layer or head is a JaxlmError naming it."""
    group = group or next(iter(maps))
    if group not in maps:
        raise JaxlmError(f"--group {group}: the model has {', '.join(maps)}")
    n_layers, n_heads = maps[group].shape[:2]
    if not 0 <= layer < n_layers:
        raise JaxlmError(f"--layer {layer}: the model has layers 0..{n_layers - 1}")
    if not 0 <= head < n_heads:
        raise JaxlmError(f"--head {head}: the model has heads 0..{n_heads - 1}")
    return maps[group][layer, head]


def draw_map(probs_TS: np.ndarray, tokens: list[str], title: str, out: str | os.PathLike) -> Figure:
    """A heatmap with the query tokens down the side and the key tokens along the top."""
    size = max(4.0, 0.3 * len(tokens) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    image = ax.imshow(probs_TS, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return fig
