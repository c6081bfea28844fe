"""What checkpointing costs the training loop: an async save as the loop sees it, and a
restore, through jaxlm/checkpoint.py's `Checkpointer` (orbax, async, checksummed).

The loop calls `save` (which snapshots the state and hands the write to background
threads) and `poll` (which starts checksumming finished saves) every step. Each round
times a window of plain steps, then a save, the polls and as many steps with the
write in flight; the round's cost is the difference, as a % of the median plain step
(the issue's bar: 5%), summarised by the median and quartiles over rounds. On a
shared machine single rounds swing by tens of %, so it also reports the CPU the save
took (the round's process CPU less the plain window's). The restore is
`restore_latest`: manifest check plus orbax read.

    python benchmarks/checkpoint_cost.py [--config tiny] [--saves 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIGS, shape_overrides, train_setup


def process_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def measure(name: str, saves: int, steps_between: int) -> dict:
    import grain
    import jax
    import numpy as np

    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import CheckpointConfig
    from jaxlm.data.pipeline import Streams

    c = CONFIGS[name]
    setup = train_setup(shape_overrides(c), 1000)
    state, step_fn, abstract = setup.state, setup.step_fn, setup.abstract
    shape = (c["batch"], c["seq_len"])
    rng = np.random.default_rng(0)
    rows = [
        {
            "inputs": rng.integers(0, c["vocab"], shape[1]).astype(np.int32),
            "targets": rng.integers(0, c["vocab"], shape[1]).astype(np.int32),
            "segment_ids": np.ones(shape[1], np.int32),
            "positions": np.arange(shape[1], dtype=np.int32),
        }
        for _ in range(4 * c["batch"])
    ]
    source = grain.MapDataset.source(rows).repeat(None).to_iter_dataset().batch(c["batch"])
    data_iter = iter(Streams([source], [0], 1))  # the loop's iterator type, state and all

    def timed_step() -> float:
        nonlocal state
        t0 = time.perf_counter()
        state, metrics = step_fn(state, next(data_iter))
        float(metrics["loss"])  # the loop's log-step read
        return time.perf_counter() - t0

    for _ in range(2):
        timed_step()  # compile
    plain, costs, save_calls, poll_calls, cpu = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "ckpt", CheckpointConfig(every=1, keep=2))
        ckpt.save(0, state, data_iter)  # the first save sets up orbax's threads
        ckpt.wait()
        for step in range(1, saves + 1):
            # Saves are far apart in a run (checkpoint.every steps), so the last one is
            # done before the next starts; waiting here, untimed, keeps that true.
            ckpt.wait()
            # Paired windows: `steps_between` plain steps, then a save and as many
            # steps with the write in flight; the round's cost is the difference.
            cpu_start = process_cpu_ms()
            window = [timed_step() for _ in range(steps_between)]
            plain.extend(window)
            cpu_plain = process_cpu_ms() - cpu_start
            cpu_start = process_cpu_ms()
            t0 = time.perf_counter()
            ckpt.save(step, state, data_iter)
            save_calls.append(time.perf_counter() - t0)
            polls, with_save = 0.0, 0.0
            for _ in range(steps_between):
                with_save += timed_step()
                t0 = time.perf_counter()
                ckpt.poll()
                polls += time.perf_counter() - t0
            poll_calls.append(polls)
            costs.append(save_calls[-1] + polls + with_save - sum(window))
            ckpt.wait()
            # The save's CPU: this window's less the plain window's.
            cpu.append(process_cpu_ms() - cpu_start - cpu_plain)
        t0 = time.perf_counter()
        ckpt.wait()
        finish = time.perf_counter() - t0
        ckpt.close()

        data_iter = iter(Streams([source], [0], 1))
        t0 = time.perf_counter()
        restored = Checkpointer(Path(tmp) / "ckpt", CheckpointConfig()).restore_latest(
            abstract, data_iter, fallback=False
        )
        jax.block_until_ready(restored)
        restore_s = time.perf_counter() - t0
    step_s = statistics.median(plain)
    save_s = statistics.median(save_calls)
    cost = statistics.median(costs)
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    return {
        "config": name,
        "state_mb": n_bytes / 2**20,
        "step_ms": step_s * 1e3,
        "save_call_ms": save_s * 1e3,
        "poll_calls_ms": statistics.median(poll_calls) * 1e3,
        "in_flight_slowdown_ms": (cost - save_s - statistics.median(poll_calls)) * 1e3,
        "save_cost_ms": cost * 1e3,
        "save_pct_of_step": 100 * cost / step_s,
        "save_pct_rounds": [round(100 * c / step_s, 1) for c in costs],
        "save_pct_quartiles": [
            round(100 * q / step_s, 1) for q in statistics.quantiles(costs, n=4)
        ],
        "save_cpu_ms": statistics.median(cpu),
        "final_wait_ms": finish * 1e3,
        "restore_ms": restore_s * 1e3,
        "saves_timed": saves,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--saves", type=int, default=6, help="paired rounds")
    parser.add_argument("--every", type=int, default=5, help="steps between saves")
    args = parser.parse_args()
    print(json.dumps(measure(args.config, args.saves, args.every)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
