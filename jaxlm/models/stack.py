"""Stacking a block `n_layers` times: scanned (one compiled layer, params with a
leading `layers` axis) or unrolled, optionally rematerialised. Shared by every family
so scan and remat behave the same everywhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn

from jaxlm.config import ModelConfig
from jaxlm.models.projection import OUTPUT_MAJOR

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


def stack_layers(
    block: type[nn.Module], c: ModelConfig, deterministic: bool, x: jax.Array, *args: Any
) -> jax.Array:
    """`c.n_layers` blocks over `x`, scanned (one `layers`-axis param stack) or unrolled,
    remat'ed by `c.remat`; `args` are broadcast to every block. Blocks return (x, None)."""
    if c.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
        stack = nn.scan(
            block,
            # "cache": decoding's KV cache; OUTPUT_MAJOR: its steps' kernels (projection.py)
            variable_axes={"params": 0, "cache": 0, OUTPUT_MAJOR: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(c, deterministic, name="layers")(x, *args)
        return x
    for i in range(c.n_layers):
        x, _ = block(c, deterministic, name=f"layers_{i}")(x, *args)
    return x


def unstack_layers(params: Any) -> Any:
    """A scanned stack's params (a `layers` entry whose leaves lead with the layer axis)
    as the unrolled stack's `layers_{i}` entries, at any depth, so the same weights run
    through `scan_layers=False`: decoding on CPU does, as it ran 2x slower through
    the scan (GPT-2 small, 8 rows; `jaxlm.runtime.unrolled_decoding`)."""
    if not isinstance(params, Mapping):
        return params
    out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
    if "layers" in params:
        stacked = params["layers"]
        n_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        for i in range(n_layers):
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return out
