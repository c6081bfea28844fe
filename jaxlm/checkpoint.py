"""Checkpoints: an orbax `CheckpointManager` holding the train state and the data
iterator's position, saved asynchronously every N steps, checksummed once written.

Restoring takes the abstract state (shapes plus the *current* mesh's shardings), so a
checkpoint written under one mesh comes back laid out for whatever mesh is running now.
Resuming picks the newest checkpoint that is complete and intact, and says which
ones it passed over.

Saves are orbax's async saves, the same on every platform: the loop blocks only
while orbax copies the state to host memory, and writing and checksumming happen in
background threads while the next steps run.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import integrity
from jaxlm.config import CheckpointConfig
from jaxlm.data.checkpointing import StreamsHandler, StreamsRestore, StreamsSave
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
    """The run's checkpoints: async saves, manifests once written, verified restores."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig) -> None:
        self.directory = as_path(directory)  # local or gs://
        self.config = config
        # Reported before orbax's cleanup removes them.
        self.incomplete = integrity.incomplete_steps(self.directory)
        self.manager = make_manager(self.directory, config)
        self._unsealed: list[int] = []  # saved steps still waiting for their manifest
        self._sealing: list[concurrent.futures.Future] = []
        self._sealer = concurrent.futures.ThreadPoolExecutor(1, "jaxlm-seal")

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator, force: bool = False):
        """Start an async save if `step` is due (or `force`); returns whether it started."""
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return False
        if self._in_flight():
            # The previous save must land first, so a crash never loses more than the
            # steps since it.
            self.wait()
        position = _Position(data_iter.get_state(), data_iter.num_streams)
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=StreamsSave(position))
        if self.manager.save(step, args=args, force=force):
            self._unsealed.append(step)
        return True

    def _in_flight(self) -> bool:
        sealing = any(not f.done() for f in self._sealing)
        return bool(self._unsealed) or sealing or self.manager.is_saving_in_progress()

    def poll(self) -> None:
        """Start checksumming saves that have finished, in the background; cheap enough
        to call every step."""
        if self._unsealed and not self.manager.is_saving_in_progress():
            self._seal()

    def wait(self) -> None:
        """Block until every save in flight is on disk and checksummed."""
        self.manager.wait_until_finished()
        self._seal()
        for future in self._sealing:
            future.result()
        self._sealing = []

    def _seal(self) -> None:
        done = [f for f in self._sealing if f.done()]
        self._sealing = [f for f in self._sealing if f not in done]
        for future in done:
            future.result()  # a failed manifest raises here, at the next seal
        if jax.process_index() == 0:
            steps = [self.step_dir(step) for step in self._unsealed]
            self._sealing.append(self._sealer.submit(_write_manifests, steps))
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
        self._sealer.shutdown()


class _Position:
    """The data iterator's position, taken when the save starts: what `StreamsHandler`
    reads, while the loop moves the live iterator on."""

    def __init__(self, state: dict, num_streams: int) -> None:
        self.state, self.num_streams = state, num_streams

    def get_state(self) -> dict:
        return self.state


def _write_manifests(step_dirs: list[epath.Path]) -> None:
    for step_dir in step_dirs:
        if step_dir.is_dir():  # may have been rotated out already
            integrity.write_manifest(step_dir)
