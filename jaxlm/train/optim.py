"""AdamW with linear warmup, cosine decay and global-norm clipping.

Weight decay applies to matrices only (kernels and embeddings), never to norm
scales or biases; the mask goes by parameter name because scanned stacks give
every parameter an extra leading axis, so rank alone can't tell them apart.

With LoRA (`lora=True`) only the adapters (`lora_a`, `lora_b`) train: the frozen
weights get `optax.set_to_zero` and no optimizer state, so the state holds Adam's
moments of the adapters alone, and clipping and weight decay see the adapters only.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.config import OptimConfig

DECAYED = ("kernel", "embedding", "lora_a", "lora_b")
ADAPTERS = ("lora_a", "lora_b")


def _param_name(path: tuple[Any, ...]) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: _param_name(p) in DECAYED, params)


def trainable_labels(params: Any) -> Any:
    """ "train" for a LoRA adapter, "frozen" for every other parameter."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if _param_name(p) in ADAPTERS else "frozen", params
    )


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def make_optimizer(
    config: OptimConfig, total_steps: int, lora: bool = False
) -> optax.GradientTransformation:
    adamw = optax.adamw(
        make_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    tx = adamw
    if config.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    if lora:
        return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels)
    return tx
