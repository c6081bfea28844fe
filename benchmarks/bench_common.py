"""What every benchmark shares: the model shapes, the FLOP formula, the fp32 matmul peak,
peak RSS, and running one measurement in a fresh subprocess that prints JSON.

A fresh process per measurement keeps compile caches, allocator state and thread pools
from leaking between jaxlm and the reference, so alternating runs compare like with like.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "bench" / "torch_gpt_reference.py"

# GPT-2 architecture in every one; `smoke` exists only so the test suite can run the
# whole command in seconds.
CONFIGS = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, seq_len=256, batch=8, vocab=8192),
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, seq_len=1024, batch=2, vocab=50304),
    "smoke": dict(d_model=64, n_layers=2, n_heads=2, seq_len=32, batch=2, vocab=1024),
}
FLOPS_FORMULA = "6 * (N_nonembedding + V * d) + 12 * L * d * T"


def shape_overrides(c: dict, n_layers: int | None = None) -> list[str]:
    """jaxlm config overrides for config `c`'s shape (`n_layers` replaces its depth),
    on one device."""
    return [
        f"model.d_model={c['d_model']}",
        f"model.n_layers={c['n_layers'] if n_layers is None else n_layers}",
        f"model.n_heads={c['n_heads']}",
        f"model.vocab_size={c['vocab']}",
        f"model.max_len={c['seq_len']}",
        f"train.seq_len={c['seq_len']}",
        f"train.batch_size={c['batch']}",
        "mesh.data=1",
    ]


@dataclasses.dataclass
class TrainSetup:
    config: Any
    mesh: Any
    rules: Any
    model: Any
    tx: Any
    abstract: Any  # the state's shapes and shardings
    shardings: Any
    state: Any
    step_fn: Any  # jitted and state-donating, as `jaxlm train` runs it
    raw_step: Any  # the pure train_step


def train_setup(
    overrides: list[str],
    total_steps: int,
    config_path: str | None = None,
    devices: list[Any] | None = None,
) -> TrainSetup:
    """jaxlm's model, train state and step, built as `jaxlm train` builds them, for
    `config_path` (None: the defaults) with `overrides` (start from `shape_overrides`),
    on `devices` (None: the first device)."""
    import jax

    from jaxlm import sharding as shd
    from jaxlm.config import load_config
    from jaxlm.models import build_model
    from jaxlm.train.optim import make_optimizer, make_schedule
    from jaxlm.train.state import init_state, state_shardings
    from jaxlm.train.step import jit_steps, make_eval_step, make_train_step

    config = load_config(config_path, overrides)
    mesh = shd.make_mesh(config.mesh, devices or jax.devices()[:1])
    rules = shd.logical_rules(config.mesh)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, total_steps)
    length = config.train.seq_len
    abstract, shardings = state_shardings(model, tx, length, mesh, rules)
    state = init_state(model, tx, length, shardings, jax.random.PRNGKey(0), mesh, rules)
    raw_step = make_train_step(model, tx, make_schedule(config.optim, total_steps))
    step_fn, _ = jit_steps(raw_step, make_eval_step(model), shardings, mesh, rules)
    return TrainSetup(config, mesh, rules, model, tx, abstract, shardings, state, step_fn, raw_step)


def flops_per_token(c: dict) -> float:
    """The reference's `model_flops_per_token` (its docstring): N_nonembedding counts every
    parameter but the two embeddings (QKV, out, MLP, biases, LayerNorms), V*d is the tied
    LM head, 12*L*d*T the attention scores and values over the full T x T square."""
    d, n_layers, vocab, t = c["d_model"], c["n_layers"], c["vocab"], c["seq_len"]
    non_embedding = n_layers * (12 * d * d + 13 * d) + 2 * d
    return 6 * (non_embedding + vocab * d) + 12 * n_layers * d * t


def xla_matmul_peak_gflops(
    n: int = 2048,
    samples: int = 5,
    min_sample_s: float = 0.3,
    dtype: Any = None,
    device: Any = None,
) -> float:
    """Median GFLOP/s of n x n products through XLA (fp32 unless `dtype`, on `device`
    or the default one), timed like the reference's torch.matmul peak (same n, samples
    and sample length)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype or jnp.float32)
    a = jax.device_put(a, device)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    iters = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-9)))
    rates = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = mm(a)
        out.block_until_ready()
        rates.append(2.0 * n**3 * iters / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd` in a fresh process from the repo root; its last stdout line is JSON."""
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def python() -> str:
    return sys.executable


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return REFERENCE.is_file()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"
