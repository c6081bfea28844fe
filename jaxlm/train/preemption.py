"""Turning SIGTERM/SIGINT into "finish this step, checkpoint, exit".

A TPU VM or a batch scheduler sends SIGTERM before it takes the machine away. The
handler only sets a flag; the loop checks it after each step, saves synchronously and
raises `Preempted`, which the CLI turns into exit code 75 (EX_TEMPFAIL: run me
again). A second Ctrl-C aborts at once. With several processes JAX's own preemption
service owns SIGTERM, and orbax's `reached_preemption` makes every host save the
same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from jaxlm.errors import JaxlmError

PREEMPTED_EXIT_CODE = 75


class Preempted(JaxlmError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, step: int, where: str) -> None:
        self.step = step
        super().__init__(
            f"preempted at step {step}: checkpoint saved to {where}; run again to resume"
        )


class PreemptionGuard:
    """Context manager that records SIGTERM/SIGINT instead of dying mid-step."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: finishing the step and saving a checkpoint", flush=True)

    def __enter__(self) -> PreemptionGuard:
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
