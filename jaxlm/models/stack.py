"""Stacking a block `n_layers` times: scanned (one compiled layer, params with a
leading `layers` axis) or unrolled, optionally rematerialised. Shared by every family
so scan and remat behave the same everywhere."""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from jaxlm.model_config import ModelConfig, remat_offloaded_names, remat_saved_names

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


def remat_policy(remat: str, offload: str = "") -> Any:
    """The `jax.checkpoint` policy of `model.remat`: `full`, `dots`, or a list of the
    activations to keep (`save:NAME+NAME`, or a named recipe of `REMAT_RECIPES`, as
    MaxText's `minimal` and `minimal_with_context`); the rest is recomputed, except
    `offload`'s names (`model.remat_offload`), which wait in host memory."""
    if not offload:
        if remat in REMAT_POLICIES:
            return REMAT_POLICIES[remat]
        return jax.checkpoint_policies.save_only_these_names(*remat_saved_names(remat))
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[] if remat == "full" else list(remat_saved_names(remat)),
        names_which_can_be_offloaded=list(remat_offloaded_names(offload)),
        offload_src="device",
        offload_dst="pinned_host",
    )


def stack_layers(
    block: type[nn.Module],
    c: ModelConfig,
    deterministic: bool,
    x: jax.Array,
    *args: Any,
    **attributes: Any,
) -> jax.Array:
    """`c.n_layers` blocks over `x`, scanned (one `layers`-axis param stack) or unrolled,
    remat'ed by `c.remat`; `args` are broadcast to every block. Blocks return (x, None).
    `attributes` are the block's further module fields (hashable; e.g. the decoder's lora)."""
    if c.remat != "none":
        block = nn.remat(
            block, policy=remat_policy(c.remat, c.remat_offload), prevent_cse=not c.scan_layers
        )
    if c.scan_layers:
        stack = nn.scan(
            block,
            # "cache": decoding's KV cache; "intermediates": attention maps on request
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(c, deterministic, name="layers", **attributes)(x, *args)
        return x
    for i in range(c.n_layers):
        x, _ = block(c, deterministic, name=f"layers_{i}", **attributes)(x, *args)
    return x
