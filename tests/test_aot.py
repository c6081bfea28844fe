"""`jaxlm compile`: the real train step compiled for a TPU slice by libtpu, on this CPU."""

import json
import math
import subprocess
import sys

import pytest

from jaxlm.aot import compile_train_step, parse_topology
from jaxlm.config import load_config
from jaxlm.errors import JaxlmError

from .conftest import REPO, TINY, subprocess_env

pytest.importorskip("libtpu", reason="libtpu is in the test extra: pip install -e '.[test]'")

GIB = 1024**3


@pytest.mark.parametrize(
    "name, libtpu_name, chips",
    [
        ("v5p-128", "v5p:4x4x4", 64),  # v5p names count TensorCores, two per chip
        ("v5p-512", "v5p:4x8x8", 256),
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5e-2x2", "v5e:2x2", 4),
        ("v5e-8", "v5e:2x4", 8),
        ("v6e-256", "v6e:16x16", 256),
    ],
)
def test_topology_names(name, libtpu_name, chips):
    topology = parse_topology(name)
    assert (topology.libtpu_name, topology.chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name", ["v9-8", "v5p-3", "v5e-2x2x2", "tpu"])
def test_bad_topology_names(name):
    with pytest.raises(JaxlmError, match=f"--topology '{name}'"):
        parse_topology(name)


def _tiny(*overrides):
    return load_config(None, [*TINY, "model.vocab_size=512", *overrides])


@pytest.fixture(scope="module")
def fsdp():
    """The tiny model's scanned step, FSDP over a v5e-2x2, with the whole-step estimate."""
    v5e = parse_topology("v5e-2x2")
    return compile_train_step(_tiny("mesh.data=1", "mesh.fsdp=4"), v5e, top=1000, estimate=True)


def test_sharding_divides_the_state_across_chips(fsdp):
    """FSDP keeps 1/4 of the state per chip, data parallelism all of it; donation aliases it."""
    v5e = parse_topology("v5e-2x2")
    dp = compile_train_step(_tiny("mesh.data=4", "mesh.strategy=data"), v5e, top=1000)
    assert fsdp.fits and dp.fits
    state_fsdp = sum(a.shard_bytes for a in fsdp.largest)
    state_dp = sum(a.shard_bytes for a in dp.largest)
    full = sum(math.prod(a.shape) * 4 for a in dp.largest)
    assert state_dp == full and state_fsdp < full / 3  # a few small arrays stay whole
    # TPU tiles pad small arrays, so XLA's figures are at least the shards, and ordered.
    assert fsdp.argument_bytes >= state_fsdp and dp.argument_bytes >= state_dp
    assert fsdp.argument_bytes < dp.argument_bytes
    # The donated state comes back in place: only the scalar metrics are new outputs.
    assert fsdp.output_bytes - fsdp.alias_bytes < 4096
    n_tokens = 8 * 64
    assert fsdp.flops_per_step > 6 * fsdp.n_params * n_tokens * 0.9
    assert fsdp.xla_flops_per_chip > 0


def test_logits_that_cannot_fit_are_reported(tmp_path):
    """A 16k-row batch of 32k-vocab logits needs 32 GiB per chip on a v5e-2x2 (16 GiB)."""
    env = subprocess_env()
    args = [*TINY, "model.vocab_size=32768", "train.batch_size=16384", "mesh.data=1"]
    command = [sys.executable, "-m", "jaxlm.cli", "compile", *args, "mesh.fsdp=4", "--topology"]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2 and "expected one argument" in out.stderr
    out = subprocess.run(
        [*command, "v5e-2x2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "v5e:2x2, 4 chips, 16.00 GiB HBM per chip" in out.stdout
    assert "mesh: data=1 x fsdp=4 x tensor=1 x sequence=1" in out.stdout
    assert out.stdout.rstrip().endswith("DOES NOT FIT")
    total = next(line for line in out.stdout.splitlines() if line.strip().startswith("total"))
    logits_per_chip = 16384 // 4 * 64 * 32768 * 4
    assert float(total.split()[1]) * GIB > logits_per_chip


def test_multislice_meshes_put_data_parallelism_across_slices():
    from jaxlm import sharding as shd
    from jaxlm.aot import topology_devices
    from jaxlm.config import MeshConfig

    devices = topology_devices(parse_topology("v5e-2x2"), slices=2)
    assert len(devices) == 8
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=4), devices)
    for row, slice_index in zip(mesh.devices, (0, 1), strict=True):
        assert {d.slice_index for d in row.flat} == {slice_index}  # fsdp stays inside a slice
    with pytest.raises(JaxlmError, match="'mesh.data': 1 is not a multiple of the 2 slices"):
        shd.make_mesh(MeshConfig(data=1, fsdp=8), devices)


def test_steps_for_tpu_meshes_take_the_tpu_compile_options():
    """The all-gather CSE threshold goes to TPU compiles only: CPU's XLA rejects TPU flags.
    (libtpu accepting it is shown by every TPU compile in this file.)"""
    import jax

    from jaxlm import sharding as shd
    from jaxlm.aot import topology_devices
    from jaxlm.config import MeshConfig
    from jaxlm.train.xla_options import for_mesh

    tpu = shd.make_mesh(MeshConfig(data=1, fsdp=4), topology_devices(parse_topology("v5e-2x2")))
    assert for_mesh(tpu) == {"xla_tpu_spmd_threshold_for_allgather_cse": 10000}
    assert for_mesh(shd.make_mesh(MeshConfig(data=1, fsdp=-1), jax.devices())) is None


def test_default_attention_compiles_the_splash_kernel_for_tpu():
    """model.attention=auto resolves for the mesh's devices: splash for a llama on a TPU
    topology, though this host is a CPU; an explicit einsum has no kernel."""
    llama = ["model.family=llama", "train.seq_len=128", "model.max_len=128"]
    v5e = parse_topology("v5e-2x2")
    auto = compile_train_step(_tiny(*llama, "mesh.data=1", "mesh.fsdp=4"), v5e)
    assert any(k.startswith("splash_mqa_fwd") for k in auto.kernels), auto.kernels
    assert any("dkv" in k for k in auto.kernels)  # the backward pass too
    einsum = compile_train_step(
        _tiny(*llama, "mesh.data=1", "mesh.fsdp=4", "model.attention=einsum"), v5e
    )
    assert einsum.kernels == []


def test_remat_with_context_keeps_the_splash_forward():
    """Under `dots` the backward reruns splash's forward (a custom call XLA can't see
    into); `minimal_with_context` saves its output and log-sum-exp, so each of the two
    unrolled layers calls forward, dkv and dq once: 6 calls against 8."""
    llama = ["model.family=llama", "train.seq_len=128", "model.max_len=128", "mesh.fsdp=4"]
    v5e = parse_topology("v5e-2x2")
    calls = {
        remat: compile_train_step(
            _tiny(*llama, "mesh.data=1", "model.scan_layers=false", f"model.remat={remat}"), v5e
        ).kernel_calls
        for remat in ("dots", "minimal_with_context")
    }
    assert calls == {"dots": 8, "minimal_with_context": 6}


def test_compile_reports_the_compilers_whole_step_estimate(fsdp):
    """What `jaxlm compile` prints (and --json) for the scanned tiny gpt2: the estimate
    covers both layers. The hand formula: 6 N' T + 12 L d S T, N' = parameters without the
    position table; N = V d + M d + L (12 d^2 + 13 d) + 2 d (tied, with biases)."""
    from jaxlm.aot_report import format_report, report_json

    v, m, d, layers, seq, rows, chips = 512, 64, 64, 2, 64, 8, 4
    out = json.loads(json.dumps(report_json(fsdp)))
    n = v * d + m * d + layers * (12 * d * d + 13 * d) + 2 * d
    assert out["n_params"] == n
    model = (6 * (n - m * d) + 12 * layers * d * seq) * rows * seq
    assert out["model_flops_per_step"] == pytest.approx(model)
    est = out["estimate"]
    assert est["unavailable"] == "" and "unrolled" in est["method"]
    seconds = est["step_seconds"]
    assert 0 < seconds < 1
    assert est["tokens_per_s_per_chip"] == pytest.approx(rows * seq / chips / seconds)
    assert est["mfu"] == pytest.approx(model / chips / (seconds * 197e12))
    # The scanned program counts one layer of two; the estimate's program both (XLA also
    # counts the optimizer and the loss, so a little more than the model's matmuls).
    assert out["xla_flops_per_chip_compiled"] < 0.8 * model / chips
    assert 0.95 < est["xla_flops_per_chip"] / (model / chips) < 1.3
    assert out["collectives"]["all-gather"]["count"] > 0
    text = format_report(fsdp)
    assert "compiler's estimates (libtpu's cost model, not a measurement)" in text
    for line in ("step time", "tokens/s/chip", "MFU", "all-gather", "reduce-scatter"):
        assert f"\n  {line}" in text


def test_offloaded_activations_are_reported_in_host_memory():
    """model.remat_offload compiles for TPU and its activations show as host memory, with
    the cost model's caveat; without it there is none."""
    from jaxlm.aot_report import format_report

    v5e = parse_topology("v5e-2x2")
    offload = ("mesh.data=1", "mesh.fsdp=4", "model.remat=full")
    report = compile_train_step(_tiny(*offload, "model.remat_offload=mlpwi+context"), v5e)
    # 2 layers x 8 rows x 64 positions x (the MLP's 256 wide input + attention's 64) x 4 B
    # (float32) over 4 chips
    assert report.host_temp_bytes >= 2 * 8 * 64 * (256 + 64) * 4 // 4
    assert "host memory" in format_report(report) and "optimistic" in format_report(report)


def test_a_step_too_big_to_unroll_is_extrapolated_from_2_and_4_layers(monkeypatch):
    """Where the unrolled step does not fit, the estimate is the straight line through 2
    and 4 unrolled layers; cut to 1 and 2 here, on 3 layers it lands on the 3-layer
    unrolled compile."""
    from jaxlm import aot
    from jaxlm import sharding as shd

    monkeypatch.setattr(aot, "EXTRAPOLATE_FROM", (1, 2))
    config = _tiny("mesh.data=1", "mesh.fsdp=4", "model.n_layers=3")
    mesh = shd.make_mesh(config.mesh, aot.topology_devices(parse_topology("v5e-2x2")))
    rules = shd.logical_rules(config.mesh)
    whole = aot._unrolled_estimate(config, mesh, rules, "3 layers unrolled")
    assert whole.ok

    unrolled = aot._unrolled_estimate

    def out_of_memory_at_three(cfg, *args):
        if cfg.model.n_layers == 3:
            return aot.StepEstimate(method="", unavailable="...: RESOURCE_EXHAUSTED: ...")
        return unrolled(cfg, *args)

    monkeypatch.setattr(aot, "_unrolled_estimate", out_of_memory_at_three)
    line = aot._estimate(config, None, [3], mesh, rules)
    assert line.ok and "compiles of 1 and 2 layers" in line.method
    assert "extrapolated to 3" in line.method and "on v5e this overestimates" in line.method
    assert line.seconds == pytest.approx(whole.seconds, rel=0.01)
    assert line.xla_flops == pytest.approx(whole.xla_flops, rel=0.001)
    assert line.bytes_accessed == pytest.approx(whole.bytes_accessed, rel=0.02)


# A hand-written module: a loop of 3 iterations gathering 2x8 f32 (64 B) per iteration,
# an async all-reduce of 4 bf16, a reduce-scatter to 4 f32 over groups of 4, and TPU's
# fused reduce-scatter (an all-reduce of 16 f32 and a dynamic slice) run twice by a call.
HLO = """HloModule jit_train_step, entry_computation_layout={(f32[2,2]{1,0})->f32[]}

%cond (p: (s32[], f32[2,8])) -> pred[] {
  %p = (s32[], f32[2,8]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %limit = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT
}

%body (p.1: (s32[], f32[2,8])) -> (s32[], f32[2,8]) {
  %p.1 = (s32[], f32[2,8]{1,0}) parameter(0)
  %x = f32[2,2]{1,0:T(2,128)} get-tuple-element(%p.1), index=1
  %k = f32[2,2]{1,0} custom-call(%x), frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 512}"
}}, metadata={op_name="splash"}
  %ag = f32[2,8]{1,0:T(2,128)} all-gather(%x), replica_groups={{0,1,2,3}}, dimensions={1}
  ROOT %t = (s32[], f32[2,8]{1,0}) tuple(%i, %ag)
}

%all-reduce-scatter.3 (input.3: f32[16]) -> f32[4] {
  %input.3 = f32[16]{0:T(128)} parameter(0)
  %all-reduce.9 = f32[16]{0:T(128)} all-reduce(%input.3), replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %ds = f32[4]{0} dynamic-slice(%all-reduce.9, %off), dynamic_slice_sizes={4}
}

%twice (q: f32[16]) -> f32[4] {
  %q = f32[16]{0} parameter(0)
  ROOT %fusion.3 = f32[4]{0:T(128)} fusion(%q), kind=kCustom, calls=%all-reduce-scatter.3
}

ENTRY %main (a: f32[2,2]) -> f32[] {
  %a = f32[2,2]{1,0} parameter(0)
  %w = (s32[], f32[2,8]{1,0}) while(%init), condition=%cond, body=%body
  %ars = bf16[4]{0} all-reduce-start(%b), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  %ard = bf16[4]{0} all-reduce-done(%ars)
  %rs = f32[4]{0} reduce-scatter(%c), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %c1 = f32[4]{0} call(%q16), to_apply=%twice
  %c2 = f32[4]{0} call(%q16), to_apply=%twice
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_are_counted_by_how_often_they_run():
    """Also past a kernel's multi-line config, whose lines may open with "}" (splash's
    do: collectives after it in a loop body were once dropped)."""
    from jaxlm.aot_estimate import summarize_hlo

    s = summarize_hlo(HLO)
    assert s.loops == [3]
    assert s.collectives["all-gather"] == (3, 3 * 2 * 8 * 4)
    assert s.collectives["all-reduce"] == (1, 4 * 2)
    assert s.collectives["reduce-scatter"] == (1 + 2, 4 * 4 * 4 + 2 * 16 * 4)
    assert s.collectives["collective-permute"] == (0, 0)


class _Compiled:
    def __init__(self, seconds: float, text: str) -> None:
        self.seconds, self.text = seconds, text

    def cost_analysis(self) -> dict:
        return {"optimal_seconds": self.seconds, "flops": 1e9, "bytes accessed": 1e6}

    def as_text(self) -> str:
        return self.text


def test_nonsense_cost_model_times_are_not_printed_as_times():
    from jaxlm.aot_estimate import estimate_from_compiled

    two = 'custom-call(), custom_call_target="ConcatBitcast"\n' * 2
    fixed = estimate_from_compiled(_Compiled(-1.982, two), "test")
    assert fixed.ok and fixed.seconds == pytest.approx(0.018)  # -1 s per call added back
    for bad in (_Compiled(-3.0, two), _Compiled(0.0, ""), _Compiled(0.5, HLO)):
        est = estimate_from_compiled(bad, "test")
        assert not est.ok and est.unavailable
    assert "while loop" in estimate_from_compiled(_Compiled(0.5, HLO), "t").unavailable


@pytest.mark.parametrize("name", ["v4-8", "v5e-4", "v5p-8", "v6e-4"])
def test_compile_peak_is_the_trainers_peak_for_the_same_chip(name):
    """The estimate's MFU and a run's logged MFU divide by the same per-chip peak."""
    from jaxlm.aot import CompileReport, topology_devices
    from jaxlm.train.metrics import PEAK_TFLOPS

    topology = parse_topology(name)
    kind = topology_devices(topology)[0].device_kind.lower()
    trainer = next(t for k, t in PEAK_TFLOPS.items() if k in kind)  # the trainer's lookup
    report = CompileReport(topology=topology, slices=1, mesh={}, n_params=0)
    assert report.peak_flops == trainer * 1e12


def test_search_stops_at_its_budget_and_caches_by_config(tmp_path):
    """A 1 s budget compiles the first candidate only; a rerun with none left reads it
    from the cache (keyed by the resolved config) and still skips the other."""
    from jaxlm.aot_search import search

    small = [*TINY, "model.vocab_size=512", "model.n_layers=1", "model.scan_layers=false"]
    v5e = parse_topology("v5e-2x2")
    space = ["model.remat=none,full", "mesh=fsdp"]
    logs: list[str] = []
    first = search(None, small, v5e, space, 1.0, cache_dir=tmp_path, log=logs.append)
    assert [line.split("]")[1].split(":")[0].strip() for line in logs] == ["compiling", "skipped"]
    assert len(list(tmp_path.glob("*.json"))) == 1
    (words, record), (_, skipped) = first
    assert words[0] == "model.remat=none" and record["fits"] and skipped == {}
    assert record["estimate"]["step_seconds"] > 0
    logs.clear()
    again = search(None, small, v5e, space, 0.0, cache_dir=tmp_path, log=logs.append)
    assert ["cached" in line for line in logs] == [True, False]
    assert again[0] == (words, record)


def test_search_ranking_puts_fitting_fast_setups_first():
    from jaxlm.aot_search import format_search, rank

    def rec(fits, seconds, gib):
        est = {"step_seconds": seconds, "tokens_per_s_per_chip": 1000 / seconds, "mfu": 0.5}
        memory = {"total": gib * GIB}
        return {"fits": fits, "estimate": est, "memory_bytes": memory, "hbm_bytes": 16 * GIB}

    results = [
        (["a"], rec(False, 0.1, 20)),  # fastest, but does not fit
        (["e"], rec(True, 0.15, 15)),  # fits, but with under 10% of HBM free
        (["b"], rec(True, 0.4, 4)),
        (["c"], rec(True, 0.2, 12)),
        (["d"], {"fits": True, "estimate": {"unavailable": "x"}, "memory_bytes": {"total": 0}}),
    ]
    ranked = rank(results)
    assert [w[0] for w, _ in ranked] == ["c", "b", "d", "e", "a"]
    lines = format_search(ranked, 16 * GIB).splitlines()
    assert lines[-1] == "best: c"
    assert [line.split()[1] for line in lines[2:-1]] == ["yes", "yes", "yes", "tight", "no"]
    tight_only = format_search(rank(results[:2]), 16 * GIB).splitlines()[-1]
    assert tight_only == "best (tight: under 10% of HBM free): e"


def test_search_refuses_a_bad_space_before_compiling(capsys):
    from jaxlm.cli import main

    args = ["compile", *TINY, "--topology", "v5e-2x2", "--search", "--space", "mesh=ring"]
    assert main(args) == 2
    assert "--space 'mesh=ring': unknown mesh 'ring'" in capsys.readouterr().err
