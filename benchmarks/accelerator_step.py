"""A measured train step of a preset on this machine's accelerators, with its MFU.

Issue #18's check on a GPU (or TPU) machine: the model, train state and jitted step are
built as `jaxlm train` builds them (`bench_common.train_setup`), FSDP over every local
device, and `--steps` steps on random tokens are timed after `--warmup` steps, each
ending on a host read of the loss. MFU is the model's training FLOPs (the family's
`flops_per_token`, the formula `jaxlm train` logs) over the step time, against two
peaks: the chip's dense bf16 figure (`jaxlm.train.metrics.PEAK_TFLOPS`, from its data
sheet) and the bf16 matmul rate measured on the same device in the same run, before and
after the steps (the higher of the two). Memory is the device allocator's peak.

    python benchmarks/accelerator_step.py                      # llama-1b, 2048 x 8 rows/device
    python benchmarks/accelerator_step.py --rows 4 --extra model.remat=full
    python benchmarks/accelerator_step.py --smoke              # a tiny llama on CPU, seconds

Installing for a GPU: `pip install -e . 'jax[cuda12]'` (the lock is for CPU tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import summary, train_setup, xla_matmul_peak_gflops

SMOKE = [
    "model.family=llama",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=128",
    "model.vocab_size=512",
    "tokenizer.vocab_size=512",
    "model.dtype=float32",
]
FSDP = ["mesh.data=1", "mesh.fsdp=-1", "mesh.strategy=fsdp"]


def measure(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlm import sharding as shd
    from jaxlm.model_config import flops_per_token
    from jaxlm.train.metrics import PEAK_TFLOPS
    from jaxlm.train.state import count_params

    devices = jax.devices()
    seq = args.seq_len
    overrides = [
        *(SMOKE if args.smoke else []),
        *FSDP,
        f"train.seq_len={seq}",
        f"model.max_len={seq}",
        f"train.batch_size={args.rows * len(devices)}",
        *args.extra,
    ]
    total = args.warmup + args.steps
    setup = train_setup(overrides, total, args.config, devices)
    config, state, step_fn = setup.config, setup.state, setup.step_fn
    batch, vocab = config.train.batch_size, config.model.vocab_size
    data = shd.batch_sharding(setup.mesh, setup.rules)
    rng = np.random.default_rng(0)

    def random_batch() -> dict:
        tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
        host = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
        }
        return {k: jax.device_put(v, data) for k, v in host.items()}

    def matmul_tflops() -> float:  # bf16 products on the first device
        dtype = jnp.float32 if args.smoke else jnp.bfloat16
        gflops = xla_matmul_peak_gflops(args.matmul_n, 3, 0.2, dtype, devices[0])
        return gflops / 1e3

    peaks = [matmul_tflops()]
    batches = [random_batch() for _ in range(2)]
    losses, times = [], []
    for i in range(total):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batches[i % 2])
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    peaks.append(matmul_tflops())

    step = times[args.warmup :]
    median = statistics.median(step)
    flops = flops_per_token(config.model, count_params(state.params), seq) * batch * seq
    kind = devices[0].device_kind
    sheet = next((t for name, t in PEAK_TFLOPS.items() if name in kind.lower()), 0.0)
    measured = max(peaks)
    stats = devices[0].memory_stats() or {}
    n_dev = len(devices)
    return {
        "device_kind": kind,
        "devices": n_dev,
        "config": args.config or "defaults",
        "overrides": overrides,
        "attention": setup.model.config.attention,
        "remat": config.model.remat,
        "tokens_per_step": batch * seq,
        "step_seconds": summary(step),
        "first_step_seconds": times[0],
        "tokens_per_s_per_device": batch * seq / median / n_dev,
        "model_flops_per_step": flops,
        "datasheet_tflops": sheet,
        "measured_matmul_tflops": measured,
        "mfu_datasheet": flops / median / (sheet * 1e12 * n_dev) if sheet else None,
        "mfu_measured_peak": flops / median / (measured * 1e12 * n_dev),
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "loss_first_last": [losses[0], losses[-1]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/llama-1b.yaml")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8, help="sequences per device per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the peak's products")
    ap.add_argument("--extra", nargs="*", default=[], help="key=value config overrides")
    ap.add_argument("--smoke", action="store_true", help="a tiny llama, seconds on a CPU")
    ap.add_argument("--json", help="also write the record to this file")
    args = ap.parse_args()
    if args.smoke:
        args.config, args.seq_len, args.rows = None, 64, 2
        args.steps, args.warmup, args.matmul_n = 3, 1, 256
    r = measure(args)
    s = r["step_seconds"]
    sheet = (
        f"{r['mfu_datasheet']:.1%} of the data sheet's {r['datasheet_tflops']:g} TFLOP/s"
        if r["mfu_datasheet"]
        else "- (no data-sheet peak for this chip)"
    )
    print(
        f"{r['config']} on {r['devices']} x {r['device_kind']} ({r['attention']} attention, "
        f"remat {r['remat']}): {r['tokens_per_step']:,} tokens per step\n"
        f"  step {1e3 * s['median']:.1f} ms (min {1e3 * s['min']:.1f}, max "
        f"{1e3 * s['max']:.1f}; first {r['first_step_seconds']:.1f} s with compile), "
        f"{r['tokens_per_s_per_device']:,.0f} tokens/s/device\n"
        f"  MFU {sheet}; "
        f"{r['mfu_measured_peak']:.1%} of the measured matmul rate "
        f"{r['measured_matmul_tflops']:.1f} TFLOP/s\n"
        f"  peak memory {r['peak_memory_gib']:.2f} GiB/device; loss "
        f"{r['loss_first_last'][0]:.3f} -> {r['loss_first_last'][1]:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
