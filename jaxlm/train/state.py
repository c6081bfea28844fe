"""The train state and its sharded initialisation.

Parameters are never materialised unsharded: `jax.eval_shape` gives the shapes
with their logical axis names, the rules turn those into shardings, and `init`
runs under `jit` with those output shardings. `abstract_state` is the one place that
happens: the trainer, `jaxlm compile`, `load_pretrained` (so `jaxlm eval`) and
`init_from` all take their model, shapes and shardings from it.
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
from jaxlm.config import Config, ModelConfig
from jaxlm.models import build_model


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array  # steps whose loss or gradients were NaN/inf


def _init_fn(model: nn.Module, tx: optax.GradientTransformation | None, seq_len: int):
    """init(rng) -> the TrainState, or with no optimizer the params alone."""

    def init(rng: jax.Array) -> Any:
        init_rng, state_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(init_rng, tokens)["params"]
        if tx is None:
            return params
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=state_rng,
            nonfinite=jnp.zeros((), jnp.int32),
        )

    return init


def param_shapes(config: ModelConfig) -> Any:
    """The params as ShapeDtypeStructs in their logical-axis boxes; nothing allocated."""
    model = build_model(config, seq_len=1)  # no attention kernel for a 1-token trace
    return jax.eval_shape(_init_fn(model, None, 1), jax.random.PRNGKey(0))


def _without_empty_boxes(tree: Any) -> Any:
    """`tree` with the logical-axis boxes that hold no array unwrapped: optax's masking
    (LoRA's frozen weights, optim.py) puts an empty `MaskedNode` where a moment would be,
    inside the param's box, which would otherwise get a sharding of its own."""

    def unwrap(x: Any) -> Any:
        empty = isinstance(x, nn.Partitioned) and not jax.tree_util.tree_leaves(x.value)
        return x.value if empty else x

    return jax.tree_util.tree_map(unwrap, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_shardings(
    model: nn.Module,
    tx: optax.GradientTransformation | None,
    seq_len: int,
    mesh: Mesh,
    rules: shd.Rules,
) -> tuple[Any, Any]:
    """(abstract state with shardings attached, the shardings), checked against the mesh;
    with no optimizer (`tx` None), of the params alone."""
    boxed = _without_empty_boxes(
        jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.PRNGKey(0))
    )
    shardings = shd.logical_shardings(boxed, mesh, rules)
    shd.check_divisible(boxed, shardings)
    abstract = jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def abstract_state(
    config: Config,
    mesh: Mesh,
    rules: shd.Rules,
    tx: optax.GradientTransformation | None = None,
    deterministic: bool = True,
) -> tuple[nn.Module, Any, Any]:
    """(model, abstract state, its shardings) of `config` on `mesh`: the TrainState, or
    with no optimizer the params alone. The model is built for the mesh's platform, not
    the host's, so `attention: auto` resolves for the devices that will run it (TPU
    topology devices when `jaxlm compile` runs on a CPU host)."""
    platform = mesh.devices.flat[0].platform
    model = build_model(
        config.model, deterministic, platform, config.train.seq_len, lora=config.lora
    )
    abstract, shardings = state_shardings(model, tx, config.train.seq_len, mesh, rules)
    return model, abstract, shardings


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
