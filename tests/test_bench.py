"""The benchmark command runs end to end on a very small model (`--smoke`).

The benchmarks are not part of the suite otherwise: this only checks that the command
works and that its JSON holds consistent figures (the train ratio is the ratio of the
two tokens/s it reports, the FLOPs/token is the reference's formula), with the PyTorch
side skipped when torch or the reference script is missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import CONFIGS, flops_per_token, torch_available  # noqa: E402


def test_flops_formula_matches_the_reference_by_hand():
    # tiny: N_nonembedding = 4 (12 d^2 + 13 d) + 2 d, plus V d, and 12 L d T
    d, layers, vocab, t = 256, 4, 8192, 256
    n = layers * (12 * d * d + 13 * d) + 2 * d
    assert flops_per_token(CONFIGS["tiny"]) == 6 * (n + vocab * d) + 12 * layers * d * t


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "benchmarks/run.py", "--smoke", "--only", "train", "pipeline"]
    cmd += ["--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_smoke_run_reports_train_and_pipeline(smoke):
    stdout, results = smoke
    (train,) = results["train"]
    assert train["config"] == "smoke"
    assert train["flops_per_token"] == flops_per_token(CONFIGS["smoke"])
    jx = train["jaxlm"]
    assert jx["tokens_per_sec"]["min"] <= jx["tokens_per_sec"]["median"] > 0
    assert 0 < jx["mfu"] < 1.5 and jx["peak_rss_mb"] > 0
    tokens = CONFIGS["smoke"]["batch"] * CONFIGS["smoke"]["seq_len"]
    (rnd,) = train["rounds"]
    assert rnd["jaxlm"]["tokens_per_sec"] == pytest.approx(
        tokens / (rnd["jaxlm"]["step_time_ms"] / 1e3)
    )
    if torch_available():
        ref = train["eager"]
        assert ref["ratio"]["median"] == pytest.approx(
            jx["tokens_per_sec"]["median"] / ref["tokens_per_sec"]["median"]
        )
        assert "reference eager" in stdout
    p = results["pipeline"]
    assert p["tokens_per_sec"] > 0
    assert p["headroom"] == pytest.approx(p["tokens_per_sec"] / jx["tokens_per_sec"]["median"])
    assert "pipeline:" in stdout and "load average" in stdout


def test_cpu_tuning_applies_on_cpu_only(monkeypatch):
    import jax

    from jaxlm import cpu_tuning

    assert cpu_tuning.unroll_decoding()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not cpu_tuning.unroll_decoding()


def test_accelerator_step_smoke_reports_consistent_figures():
    cmd = [sys.executable, "benchmarks/accelerator_step.py", "--smoke"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    median = r["step_seconds"]["median"]
    assert r["tokens_per_step"] == 2 * 64 * r["devices"]
    per_device = r["tokens_per_step"] / median / r["devices"]
    assert r["tokens_per_s_per_device"] == pytest.approx(per_device)
    rate = r["measured_matmul_tflops"] * 1e12 * r["devices"]
    assert r["mfu_measured_peak"] == pytest.approx(r["model_flops_per_step"] / median / rate)
    assert 0 < r["mfu_measured_peak"] < 1.5 and r["attention"] == "einsum"
    first, last = r["loss_first_last"]
    assert abs(first - math.log(512)) < 0.5 and last < first  # random tokens: from ln V, learning
