"""Checkpoints: an orbax `CheckpointManager` holding the train state and the data
iterator's position, saved asynchronously every N steps, checksummed before orbax
commits them (integrity.py).

Restoring takes the abstract state (shapes plus the *current* mesh's shardings), so a
checkpoint written under one mesh comes back laid out for whatever mesh is running now.
Resuming picks the newest checkpoint that is complete and intact, and says which
ones it passed over.

Saves are orbax's async saves, the same on every platform: the loop blocks only
while orbax copies the state to host memory, and writing and checksumming happen in
orbax's background thread while the next steps run. `checkpoint.async_save=false`
waits for that thread, so the same commit path holds for both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import integrity
from jaxlm.config import CheckpointConfig
from jaxlm.data.checkpointing import StreamsHandler, StreamsRestore, StreamsSave
from jaxlm.errors import JaxlmError
from jaxlm.paths import as_path
from jaxlm.train import faults


def make_manager(
    directory: str | os.PathLike,
    config: CheckpointConfig,
    before_commit: Callable[[], None] | None = None,
) -> ocp.CheckpointManager:
    """`before_commit` runs on process 0 once every process has written a step and
    before orbax commits it (orbax's `post_finalization_callback`)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.every,
        max_to_keep=config.keep,
        enable_async_checkpointing=True,  # the only path with a hook before the commit
        async_options=ocp.AsyncOptions(post_finalization_callback=before_commit),
        cleanup_tmp_directories=True,
        create=True,
    )
    # No zstd on the arrays: trained fp32 weights barely compress, and compressing
    # tripled the CPU a save takes beside the step (benchmarks/README.md).
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(use_compression=False),
        "data": StreamsHandler(),
    }
    return ocp.CheckpointManager(as_path(directory), options=options, item_handlers=handlers)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: grain.DatasetIterator
) -> Any:
    """The state at `step`, laid out as `abstract_state`; `data_iter` is moved in place."""
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
        ),
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
    """The run's checkpoints: async saves, sealed with a manifest before they are
    committed, verified before they are restored."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig) -> None:
        self.directory = as_path(directory)  # local or gs://
        self.config = config
        # Reported before orbax's cleanup removes them.
        self.incomplete = integrity.incomplete_steps(self.directory)
        self._saving = -1  # the step orbax is writing; one save at a time
        self.manager = make_manager(self.directory, config, self._seal)

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator, force: bool = False):
        """Start an async save if `step` is due (or `force`); returns whether it started."""
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return False
        # The previous save must land first, so a crash never loses more than the
        # steps since it.
        self.manager.wait_until_finished()
        self._saving = step
        position = _Position(data_iter.get_state(), data_iter.num_streams)
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=StreamsSave(position))
        self.manager.save(step, args=args, force=force)
        if not self.config.async_save:
            self.manager.wait_until_finished()
        return True

    def _seal(self) -> None:
        """Write the manifest into the step orbax is about to commit, so every
        committed step has one and a step without one is known to be damaged."""
        integrity.write_manifest(integrity.uncommitted_dir(self.directory, self._saving))
        faults.maybe_kill_before_commit(self._saving)

    def poll(self) -> None:
        """Raise here an error of a save that failed in the background; cheap enough to
        call every step."""
        self.manager.check_for_errors()

    def wait(self) -> None:
        """Block until every save in flight is committed."""
        self.manager.wait_until_finished()

    def restore_latest(
        self, abstract_state: Any, data_iter: grain.DatasetIterator, fallback: bool
    ) -> Any | None:
        """The newest intact checkpoint's state, or None when there is none."""
        for path in self.incomplete:
            print(f"skipping incomplete checkpoint {path.name} (a save that never finished)")
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                integrity.verify(self.step_dir(step), step)
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
        self.manager.close()


class _Position:
    """The data iterator's position, taken when the save starts: what `StreamsHandler`
    reads, while the loop moves the live iterator on."""

    def __init__(self, state: dict, num_streams: int) -> None:
        self.state, self.num_streams = state, num_streams

    def get_state(self) -> dict:
        return self.state
