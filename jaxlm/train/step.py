"""Pure train and eval steps, and their jitted, sharded, state-donating forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import sharding as shd
from jaxlm.config import Config
from jaxlm.train.objectives import CAUSAL_LM, Objective, for_family, for_model, token_loss  # noqa: F401
from jaxlm.train.optim import make_optimizer, make_schedule
from jaxlm.train.state import TrainState, abstract_state
from jaxlm.train.xla_options import for_mesh

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Sums = dict[str, jax.Array]


def split_microbatches(batch: Batch, n: int) -> Batch:
    """(B, ...) arrays -> (n, B/n, ...): microbatch i takes rows i, i + n, i + 2n, ...

    A batch sharded over its rows holds B/D consecutive rows per device; taking every
    n-th row gives each device B/(nD) rows of every microbatch, so each microbatch is
    sharded over the data axes like the whole batch, with no data moved. The
    constraint keeps it so (flax's logical rules, as the models' activations).
    """

    def split(x: jax.Array) -> jax.Array:
        parts = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(parts, (None, "batch", "length")[: parts.ndim])

    return {k: split(v) for k, v in batch.items()}


def accumulate_grads(
    model: nn.Module,
    objective: Objective,
    params: Any,
    batch: Batch,
    rng: jax.Array,
    n: int,
    grad_shardings: Any = None,
) -> tuple[Any, jax.Array, Sums]:
    """(gradient, weight, sums) of the whole batch's loss, from `n` microbatches in a
    `lax.scan`: only one microbatch's activations are live at a time.

    Each microbatch's loss is normalised by the whole batch's counts
    (`Objective.part_loss`), so the fp32 sum of their gradients is the whole batch's
    gradient, and the summed statistics give its loss and metrics, exactly (to fp32
    rounding) as one pass over the batch would. The accumulator has the params'
    sharding (`grad_shardings`); dropout draws a key per microbatch.
    """
    counts = objective.counts(batch)  # from the masks alone: no model pass
    micro = split_microbatches(batch, n)

    def constrain(grads: Any) -> Any:
        if grad_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    _, sums_shape = jax.eval_shape(lambda: objective.loss(model, params, first, rng)[1:])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape)
    grads0 = constrain(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def body(carry, xs):
        grads, (weight, sums) = carry
        i, part = xs
        part = {
            k: nn.with_logical_constraint(v, ("batch", "length")[: v.ndim]) for k, v in part.items()
        }
        key = jax.random.fold_in(rng, i)
        g, (w, s) = jax.grad(
            lambda p: objective.part_loss(model, p, part, key, counts), has_aux=True
        )(params)
        grads = constrain(jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), grads, g))
        sums = jax.tree_util.tree_map(jnp.add, sums, s)
        return (grads, (weight + w, sums)), None

    carry = (grads0, (jnp.zeros((), jnp.float32), zeros))
    (grads, (weight, sums)), _ = jax.lax.scan(body, carry, (jnp.arange(n), micro))
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, weight, sums


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    nonfinite: str = "skip",
    objective: Objective = CAUSAL_LM,
    grad_accum: int = 1,
    grad_shardings: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step of `objective` (the model family's, see train/objectives.py).

    With `grad_accum` > 1 the batch is split into that many microbatches inside the
    step (`accumulate_grads`): the same update, with a microbatch's activations live
    at a time; `grad_shardings` (the params') lays out the fp32 accumulator.
    A non-finite loss or gradient never reaches the state:

    - "skip": that update is dropped (params and optimizer unchanged), the step
      counter moves on and `nonfinite` counts it;
    - "stop": the state freezes at the last good step from then on, for the loop to
      save and stop at its next check (no host sync per step is needed).
    """

    if grad_accum > 1 and objective.counts is None:
        raise ValueError("gradient accumulation needs the objective's `counts`")

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            loss, n_tokens, sums = objective.loss(model, params, batch, rng)
            return loss, (n_tokens, sums)

        if grad_accum > 1:
            grads, n_tokens, sums = accumulate_grads(
                model, objective, state.params, batch, rng, grad_accum, grad_shardings
            )
            loss = objective.summarize(sums)["loss"]
        else:
            (loss, (n_tokens, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params
            )
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
        # The family's own metrics (BERT's accuracies); the loss is already there.
        metrics |= {k: v for k, v in objective.summarize(sums).items() if k != "loss"}
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module, objective: Objective = CAUSAL_LM
) -> Callable[[Any, Batch], Metrics]:
    """Additive sums (`objective.summarize` turns them into metrics over many batches)."""

    def eval_step(params: Any, batch: Batch) -> Metrics:
        return objective.loss(model, params, batch, None)[2]

    return eval_step


def batch_shardings(
    mesh: Mesh, rules: shd.Rules, batch_ranks: dict[str, int]
) -> dict[str, NamedSharding]:
    """Per batch key: (batch, length) arrays as `shd.batch_sharding`, (batch,) ones on
    its first axis alone."""
    data = shd.batch_sharding(mesh, rules)
    return {
        k: NamedSharding(mesh, PartitionSpec(*data.spec[:rank])) for k, rank in batch_ranks.items()
    }


class InMesh:
    """A jitted step that runs, and lowers, under the mesh and logical rules it was
    sharded for: `jaxlm compile` lowers the very object the trainer calls."""

    def __init__(self, jitted: Any, mesh: Mesh, rules: shd.Rules) -> None:
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args)


def jit_steps(
    train_step: Callable,
    eval_step: Callable,
    state_shardings: TrainState,
    mesh: Mesh,
    rules: shd.Rules,
    batch_ranks: dict[str, int] = CAUSAL_LM.batch_ranks,
) -> tuple[InMesh, InMesh]:
    """Jit both steps with explicit shardings; the train state is donated, and the train
    step takes the platform's compile options (`xla_options`). `batch_ranks` is the
    objective's batch keys and their ranks."""
    batch = batch_shardings(mesh, rules, batch_ranks)
    out = shd.replicated(mesh)
    jitted_train = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, out),
        donate_argnums=0,
        compiler_options=for_mesh(mesh),
    )
    jitted_eval = jax.jit(
        eval_step,
        in_shardings=(state_shardings.params, batch),
        out_shardings=out,
    )
    return InMesh(jitted_train, mesh, rules), InMesh(jitted_eval, mesh, rules)


def train_steps(
    config: Config, mesh: Mesh, rules: shd.Rules
) -> tuple[nn.Module, TrainState, TrainState, optax.GradientTransformation, tuple[InMesh, InMesh]]:
    """(model, abstract state, its shardings, optimizer, (train step, eval step)): what
    `train` runs, and `jaxlm compile` lowers, for `config` on `mesh`."""
    tx = make_optimizer(config.optim, config.train.steps, lora=config.lora.rank > 0)
    schedule = make_schedule(config.optim, config.train.steps)
    model, abstract, shardings = abstract_state(
        config,
        mesh,
        rules,
        tx,
        deterministic=config.model.dropout == 0.0 and config.lora.dropout == 0.0,
    )
    objective = for_model(config.model)
    steps = jit_steps(
        make_train_step(
            model,
            tx,
            schedule,
            config.train.nonfinite,
            objective,
            config.train.grad_accum,
            shardings.params,
        ),
        make_eval_step(model.clone(deterministic=True), objective),
        shardings,
        mesh,
        rules,
        objective.batch_ranks,
    )
    return model, abstract, shardings, tx, steps
