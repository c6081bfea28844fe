"""What checkpointing costs the training loop: an async save as the loop sees it, and a
restore, through jaxlm/checkpoint.py's `Checkpointer` (orbax, async, checksummed).

The loop calls `save` (which snapshots the state and hands the write to a background
thread) and `poll` (which seals finished saves with their manifest) every step. This
times both calls and the steps that run while the write is in flight, beside steps with
no save at all, and reports the loop-visible cost as a % of the median plain step (the
issue's bar: 5%). The restore is `restore_latest`: manifest check plus orbax read.

    python benchmarks/checkpoint_cost.py [--config tiny] [--saves 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIGS


def measure(name: str, saves: int, steps_between: int) -> dict:
    import grain
    import jax
    import numpy as np

    from jaxlm import sharding as shd
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import CheckpointConfig, load_config
    from jaxlm.data.pipeline import Streams
    from jaxlm.models import build_model
    from jaxlm.train.optim import make_optimizer, make_schedule
    from jaxlm.train.state import init_state, state_shardings
    from jaxlm.train.step import jit_steps, make_eval_step, make_train_step

    c = CONFIGS[name]
    config = load_config(
        None,
        [
            f"model.d_model={c['d_model']}",
            f"model.n_layers={c['n_layers']}",
            f"model.n_heads={c['n_heads']}",
            f"model.vocab_size={c['vocab']}",
            f"model.max_len={c['seq_len']}",
            f"train.seq_len={c['seq_len']}",
            f"train.batch_size={c['batch']}",
            "mesh.data=1",
        ],
    )
    mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
    rules = shd.logical_rules(config.mesh)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, 1000)
    abstract, shardings = state_shardings(model, tx, c["seq_len"], mesh, rules)
    state = init_state(model, tx, c["seq_len"], shardings, jax.random.PRNGKey(0), mesh, rules)
    step_fn, _ = jit_steps(
        make_train_step(model, tx, make_schedule(config.optim, 1000)),
        make_eval_step(model),
        shardings,
        mesh,
        rules,
    )
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
    plain = [timed_step() for _ in range(steps_between)]
    in_flight, save_calls, poll_calls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "ckpt", CheckpointConfig(every=1, keep=2))
        ckpt.save(0, state, data_iter)  # the first save sets up orbax's threads
        ckpt.wait()
        for step in range(1, saves + 1):
            # Saves are far apart in a run (checkpoint.every steps), so the last one is
            # done before the next starts; waiting here, untimed, keeps that true.
            ckpt.wait()
            t0 = time.perf_counter()
            ckpt.save(step, state, data_iter)
            save_calls.append(time.perf_counter() - t0)
            extra = 0.0  # what the steps run while the write is in flight lose
            for _ in range(steps_between):
                busy = ckpt.manager.is_saving_in_progress()
                t = timed_step()
                t0 = time.perf_counter()
                ckpt.poll()
                poll_calls.append(time.perf_counter() - t0)
                if busy:
                    extra += max(t - statistics.median(plain), 0.0)
            in_flight.append(extra)
            plain.extend(timed_step() for _ in range(2))
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
    slowdown = statistics.median(in_flight)
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    return {
        "config": name,
        "state_mb": n_bytes / 2**20,
        "step_ms": step_s * 1e3,
        "save_call_ms": save_s * 1e3,
        "poll_call_ms": statistics.median(poll_calls) * 1e3,
        "in_flight_slowdown_ms": slowdown * 1e3,
        "save_pct_of_step": 100 * (save_s + slowdown) / step_s,
        "final_wait_ms": finish * 1e3,
        "restore_ms": restore_s * 1e3,
        "saves_timed": saves,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--every", type=int, default=5, help="steps between saves")
    args = parser.parse_args()
    print(json.dumps(measure(args.config, args.saves, args.every)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
