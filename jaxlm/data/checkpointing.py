"""The data iterator's position in checkpoints, one file per stream.

grain's own orbax handler writes one file per process, which only a run with the
same process count can read. Streams (data/pipeline.py) are fixed by the config, so
a file per stream lets a checkpoint written by 2 hosts resume on 1, or on 4.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm.data.pipeline import StreamsIterator
from jaxlm.errors import JaxlmError


def _file(directory: epath.Path, index: int, num_streams: int) -> epath.Path:
    return directory / f"stream_{index}-of-{num_streams}.json"


def _grain_file(directory: epath.Path) -> epath.Path:
    """grain's own per-process file, which held the position of this process's stream."""
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def restore_tuples(state: Any) -> Any:
    """Undo JSON's tuple -> list on the packing state's `remainder_slices`.

    grain's ConcatThenSplit marks "no partial document" by the slice `(-1, -1)` and
    compares with `!=`, so a list `[-1, -1]` read back from JSON counts as a partial
    document: a run checkpointed where a row ended exactly at a document's end would
    resume with that document again.
    """
    if isinstance(state, dict):
        return {
            k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else restore_tuples(v)
            for k, v in state.items()
        }
    if isinstance(state, list):
        return [restore_tuples(v) for v in state]
    return state


class StreamsHandler:
    """Orbax handler (duck-typed, as grain's is) for a `StreamsIterator`."""

    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        it: StreamsIterator = item or args.item
        for index, state in it.get_state()["streams"].items():
            _file(directory, int(index), it.num_streams).write_text(json.dumps(state))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        it: StreamsIterator = item or args.item
        states = {}
        for index in it.indices:
            path = _file(directory, index, it.num_streams)
            if not path.exists() and len(it.indices) == 1:
                path = _grain_file(directory)  # written before streams: one per process
            if not path.exists():
                found = sorted(p.name for p in directory.iterdir())
                raise JaxlmError(
                    f"checkpoint {directory.parent.name} has no position for data stream "
                    f"{index} of {it.num_streams} (it holds {', '.join(found)}); "
                    "resume with the data.streams it was written with"
                )
            states[str(index)] = restore_tuples(json.loads(path.read_text()))
        it.set_state({"streams": states})
        return it

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(StreamsHandler, for_save=True)
@dataclasses.dataclass
class StreamsSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(StreamsHandler, for_restore=True)
@dataclasses.dataclass
class StreamsRestore(ocp.args.CheckpointArgs):
    item: Any
