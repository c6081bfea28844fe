"""Fault injection for the reliability tests, driven by environment variables.

Real subprocess tests need real faults at exact steps: a batch that makes the loss
non-finite, or a process killed while a checkpoint is being written. Unset, these
cost one environment lookup per step.
"""

from __future__ import annotations

import os
import signal

import numpy as np

POISON_ENV = "JAXLM_FAULT_POISON_STEPS"  # e.g. "5,6": those batches give NaN
KILL_ENV = "JAXLM_FAULT_KILL_DURING_SAVE"  # a step: SIGKILL right after its save starts
# a step: SIGKILL once its files and manifest are written, just before orbax commits it
KILL_BEFORE_COMMIT_ENV = "JAXLM_FAULT_KILL_BEFORE_COMMIT"


def _steps(name: str) -> frozenset[int]:
    value = os.environ.get(name, "")
    return frozenset(int(s) for s in value.split(",") if s.strip())


def maybe_poison(step: int, batch: dict[str, np.ndarray], vocab_size: int) -> dict:
    """A corrupt batch: token ids past the vocabulary embed as NaN (jnp.take fills)."""
    if step not in _steps(POISON_ENV):
        return batch
    return {**batch, "inputs": np.full_like(batch["inputs"], vocab_size + 7)}


def maybe_kill_during_save(step: int) -> None:
    """Called right after the step's async save started: orbax is writing it now."""
    if step in _steps(KILL_ENV):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_before_commit(step: int) -> None:
    """Called by the checkpointer after the manifest is written, before the commit."""
    if step in _steps(KILL_BEFORE_COMMIT_ENV):
        os.kill(os.getpid(), signal.SIGKILL)
