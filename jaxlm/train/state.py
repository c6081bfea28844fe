"""The train state and its sharded initialisation.

Parameters are never materialised unsharded: `jax.eval_shape` gives the shapes
with their logical axis names, the rules turn those into shardings, and `init`
runs under `jit` with those output shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from jaxlm import sharding as shd


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array  # steps whose loss or gradients were NaN/inf


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(init_rng, tokens)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=state_rng,
            nonfinite=jnp.zeros((), jnp.int32),
        )

    return init


def state_shardings(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seq_len: int,
    mesh: Mesh,
    rules: shd.Rules,
) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings attached, the shardings), checked against the mesh."""
    boxed = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.PRNGKey(0))
    shardings = shd.logical_shardings(boxed, mesh, rules)
    shd.check_divisible(boxed, shardings)
    abstract = jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seq_len: int,
    shardings: TrainState,
    rng: jax.Array,
    mesh: Mesh,
    rules: shd.Rules,
) -> TrainState:
    init = _init_fn(model, tx, seq_len)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
