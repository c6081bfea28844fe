"""Pure train and eval steps, and their jitted, sharded, state-donating forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from jaxlm import sharding as shd
from jaxlm.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def token_loss(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None):
    """(summed fp32 loss over real tokens, number of real tokens)."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        rngs={"dropout": rng} if rng is not None else None,
    )
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(losses * mask), jnp.sum(mask)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    nonfinite: str = "skip",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step. A non-finite loss or gradient never reaches the state:

    - "skip": that update is dropped (params and optimizer unchanged), the step
      counter moves on and `nonfinite` counts it;
    - "stop": the state freezes at the last good step from then on, for the loop to
      save and stop at its next check (no host sync per step is needed).
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            total, n_tokens = token_loss(model, params, batch, rng)
            return total / jnp.maximum(n_tokens, 1.0), n_tokens

        (loss, n_tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        apply = finite if nonfinite == "skip" else finite & (state.nonfinite == 0)

        def keep(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)

        advance = 1 if nonfinite == "skip" else apply.astype(jnp.int32)
        new_state = state.replace(
            step=state.step + advance,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": n_tokens,
            "nonfinite_steps": new_state.nonfinite,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
    def eval_step(params: Any, batch: Batch) -> Metrics:
        total, n_tokens = token_loss(model, params, batch)
        return {"loss_sum": total, "tokens": n_tokens}

    return eval_step


def jit_steps(
    train_step: Callable,
    eval_step: Callable,
    state_shardings: TrainState,
    mesh: Mesh,
    rules: shd.Rules,
) -> tuple[Callable, Callable]:
    """Jit both steps with explicit shardings; the train state is donated."""
    data = shd.batch_sharding(mesh, rules)
    batch_shardings = {k: data for k in ("inputs", "targets", "segment_ids", "positions")}
    out = shd.replicated(mesh)
    jitted_train = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, out),
        donate_argnums=0,
    )
    jitted_eval = jax.jit(
        eval_step,
        in_shardings=(state_shardings.params, batch_shardings),
        out_shardings=out,
    )

    def with_context(fn: Callable) -> Callable:
        def call(*args):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(*args)

        return call

    return with_context(jitted_train), with_context(jitted_eval)
