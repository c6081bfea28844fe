"""Checkpoints: an orbax `CheckpointManager` holding the train state and the data
iterator's position, saved asynchronously every N steps, checksummed once written.

Restoring takes the abstract state (shapes plus the *current* mesh's shardings), so a
checkpoint written under one mesh comes back laid out for whatever mesh is running now.
Resuming picks the newest checkpoint that is complete and intact, and says which
ones it passed over.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import integrity
from jaxlm.config import CheckpointConfig
from jaxlm.data.checkpointing import StreamsRestore, StreamsSave
from jaxlm.errors import JaxlmError
from jaxlm.paths import as_path


def make_manager(directory: str | os.PathLike, config: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.every,
        max_to_keep=config.keep,
        enable_async_checkpointing=config.async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(as_path(directory), options=options, item_names=("state", "data"))


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: grain.DatasetIterator
) -> Any:
    """The state at `step`, laid out as `abstract_state`; `data_iter` is moved in place."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=StreamsRestore(data_iter),
    )
    try:
        restored = manager.restore(step, args=args)
    except Exception as err:  # orbax/tensorstore raise many types for unreadable data
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise JaxlmError(
            f"checkpoint step {step} in {manager.directory} cannot be restored: {first_line}"
        ) from None
    return restored.state


class Checkpointer:
    """The run's checkpoints: async saves, manifests once written, verified restores."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig) -> None:
        self.directory = as_path(directory)  # local or gs://
        self.config = config
        # Reported before orbax's cleanup removes them.
        self.incomplete = integrity.incomplete_steps(self.directory)
        self.manager = make_manager(self.directory, config)
        self._unsealed: list[int] = []  # saved steps still waiting for their manifest

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator, force: bool = False):
        """Start an async save if `step` is due (or `force`); returns whether it started."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=StreamsSave(data_iter))
        started = self.manager.save(step, args=args, force=force)
        if started:
            self._unsealed.append(step)
        return started

    def poll(self) -> None:
        """Write manifests for saves that have finished; cheap enough to call every step."""
        if self._unsealed and not self.manager.is_saving_in_progress():
            self._seal()

    def wait(self) -> None:
        """Block until every save in flight is on disk and checksummed."""
        self.manager.wait_until_finished()
        self._seal()

    def _seal(self) -> None:
        if jax.process_index() == 0:
            for step in self._unsealed:
                if self.step_dir(step).is_dir():  # may have been rotated out already
                    integrity.write_manifest(self.step_dir(step))
        self._unsealed = []

    def restore_latest(
        self, abstract_state: Any, data_iter: grain.DatasetIterator, fallback: bool
    ) -> Any | None:
        """The newest intact checkpoint's state, or None when there is none."""
        for path in self.incomplete:
            print(f"skipping incomplete checkpoint {path.name} (a save that never finished)")
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.step_dir(step)
            try:
                if integrity.has_manifest(step_dir):
                    integrity.verify(step_dir, step)
                else:
                    print(f"checkpoint step {step} has no manifest; restoring unverified")
                return restore(self.manager, step, abstract_state, data_iter)
            except JaxlmError as err:
                if not fallback:
                    raise JaxlmError(
                        f"{err}; to resume from the previous checkpoint instead, "
                        "set checkpoint.fallback=true"
                    ) from None
                print(f"skipping checkpoint step {step}: {err}")
        return None

    def close(self) -> None:
        self.wait()
        self.manager.close()
