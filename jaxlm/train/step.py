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
from jaxlm.train.objectives import CAUSAL_LM, Objective, for_family, token_loss  # noqa: F401
from jaxlm.train.optim import make_optimizer, make_schedule
from jaxlm.train.state import TrainState, abstract_state

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    nonfinite: str = "skip",
    objective: Objective = CAUSAL_LM,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step of `objective` (the model family's, see train/objectives.py).
    A non-finite loss or gradient never reaches the state:

    - "skip": that update is dropped (params and optimizer unchanged), the step
      counter moves on and `nonfinite` counts it;
    - "stop": the state freezes at the last good step from then on, for the loop to
      save and stop at its next check (no host sync per step is needed).
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            loss, n_tokens, sums = objective.loss(model, params, batch, rng)
            return loss, (n_tokens, sums)

        (loss, (n_tokens, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
    """Jit both steps with explicit shardings; the train state is donated.
    `batch_ranks` is the objective's batch keys and their ranks."""
    batch = batch_shardings(mesh, rules, batch_ranks)
    out = shd.replicated(mesh)
    jitted_train = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, out),
        donate_argnums=0,
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
    tx = make_optimizer(config.optim, config.train.steps)
    schedule = make_schedule(config.optim, config.train.steps)
    model, abstract, shardings = abstract_state(
        config, mesh, rules, tx, deterministic=config.model.dropout == 0.0
    )
    objective = for_family(config.model.family)
    steps = jit_steps(
        make_train_step(model, tx, schedule, config.train.nonfinite, objective),
        make_eval_step(model.clone(deterministic=True), objective),
        shardings,
        mesh,
        rules,
        objective.batch_ranks,
    )
    return model, abstract, shardings, tx, steps
