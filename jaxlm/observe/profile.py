"""A jax.profiler trace of a window of training steps, into RUN_DIR/profile/.

The first step compiles, so a useful window starts after it. The trace is an
`*.xplane.pb` under profile/plugins/profile/<time>/, which TensorBoard's profile
plugin or XProf opens; every process traces its own host and devices.
"""

from __future__ import annotations

import jax
from etils import epath

from jaxlm.observe.staging import local_dir, upload

PROFILE_DIR = "profile"
DEFAULT_WINDOW = (3, 5)  # `jaxlm train --profile`: a few steps after the compiling one


def default_window(steps: int) -> list[int]:
    """`DEFAULT_WINDOW` clipped to a run of `steps` steps."""
    return [min(DEFAULT_WINDOW[0], steps), min(DEFAULT_WINDOW[1], steps)]


class StepProfiler:
    """Starts a trace before step `window[0]` and stops it after step `window[1]`,
    clipped to the steps this session runs, (`first` - 1, `last`]."""

    def __init__(self, run_dir: epath.Path, window: list[int], first: int, last: int) -> None:
        self.start, self.stop = (max(window[0], first), min(window[1], last)) if window else (0, -1)
        self.target = run_dir / PROFILE_DIR
        self.local = ""
        self.active = False

    def before(self, step: int) -> None:
        if step == self.start and self.start <= self.stop:
            self.local = local_dir(self.target)
            jax.profiler.start_trace(self.local)
            self.active = True

    def after(self, step: int, state: object) -> None:
        if self.active and step == self.stop:
            jax.block_until_ready(state)  # the window's device work, not just its dispatch
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            upload(self.local, self.target)
