"""Stacking a block `n_layers` times: scanned (one compiled layer, params with a
leading `layers` axis) or unrolled, optionally rematerialised. Shared by every family
so scan and remat behave the same everywhere."""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from jaxlm.model_config import ModelConfig

# The projections' outputs, by the names attention.py and layers.py give them.
PROJECTIONS = ("query_proj", "key_proj", "value_proj", "out_proj", "mlpwi", "mlpwo")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    # MaxText's recipes of the same names: keep the projections' outputs (and, with
    # context, attention's output, so the backward never reruns the attention forward,
    # which for the splash kernel is a kernel call per layer); recompute the rest.
    "minimal": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    "minimal_with_context": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS, "context"),
}


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
        block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
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
