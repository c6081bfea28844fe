"""Checkpoints: an orbax `CheckpointManager` holding the train state and the data
iterator's position, saved asynchronously every N steps.

Restoring takes the abstract state (shapes plus the *current* mesh's shardings), so a
checkpoint written under one mesh comes back laid out for whatever mesh is running now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig
from jaxlm.errors import JaxlmError


def make_manager(directory: str | Path, config: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.every,
        max_to_keep=config.keep,
        enable_async_checkpointing=config.async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=("state", "data")
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iter: grain.DatasetIterator,
    force: bool = False,
) -> bool:
    """Save if `step` is due (or `force`); returns whether a save started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
    )
    return manager.save(step, args=args, force=force)


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    data_iter: grain.DatasetIterator,
) -> Any:
    """The state at `step`, laid out as `abstract_state`; `data_iter` is moved in place."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
    )
    try:
        restored = manager.restore(step, args=args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise JaxlmError(
            f"checkpoint {manager.directory}/{step} cannot be restored "
            f"for this config: {str(err).splitlines()[0]}"
        ) from None
    return restored.state
