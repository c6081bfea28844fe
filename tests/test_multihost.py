"""Two processes x 4 CPU devices train like one process with 8, and hand over checkpoints.

The processes are real: `jaxlm train` in two subprocesses on localhost that find
each other through `distributed.coordinator` and talk over gloo (CPU collectives).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.data.pipeline import make_dataset, owned_streams, split_documents
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import BOS_ID, load_tokenizer
from jaxlm.distributed import resolve
from jaxlm.errors import JaxlmError
from jaxlm.train.loop import train
from jaxlm.train.metrics import read_metrics
from jaxlm.train.preemption import PREEMPTED_EXIT_CODE

from .conftest import REPO, TINY, subprocess_env

ARGS = [*TINY, "name=multi", "data.streams=2", "mesh.data=2", "mesh.fsdp=4"]
STEPS = 12  # the SIGTERM after step 3 lands by step 5 or so: 7 steps to spare
PREEMPT = [f"train.steps={STEPS}", "checkpoint.every=1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(run_dir, *extra, signal_when=None) -> list[subprocess.CompletedProcess]:
    """Run the pair; `signal_when(procs)`, if given, is called while they run."""
    env = subprocess_env(
        devices=4,
        JAXLM_COORDINATOR=f"127.0.0.1:{_free_port()}",
        JAXLM_NUM_PROCESSES="2",
    )
    command = [sys.executable, "-m", "jaxlm.cli", "train", *ARGS, *extra, "--no-progress"]
    procs = [
        subprocess.Popen(
            [*command, "--run-dir", str(run_dir)],
            env=dict(env, JAXLM_PROCESS_ID=str(i)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    if signal_when:
        signal_when(procs)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The uninterrupted run, in this process on 8 devices, that the pair must match."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return run_dir, train(load_config(None, [*ARGS, *PREEMPT]), run_dir, progress=False)


@pytest.fixture(scope="module")
def preempted_pair(tmp_path_factory):
    """Two processes, SIGTERM to process 1 after step 3, then the same command again:
    (run directory, the interrupted pair's results, the resumed pair's results).
    Process 0 writes the tokenizer, process 1 waits for it."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"

    def sigterm_process_1(procs):
        deadline = time.time() + 300
        while time.time() < deadline and procs[0].poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)

    stopped = _two_processes(run_dir, *PREEMPT, signal_when=sigterm_process_1)
    return run_dir, stopped, _two_processes(run_dir, *PREEMPT)


def test_two_processes_match_one(preempted_pair, one_process_run):
    run_dir, _, results = preempted_pair
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "run directory" in results[0].stdout and "run directory" not in results[1].stdout
    assert not (run_dir / "metrics.jsonl.1").exists()
    two = read_metrics(run_dir / "metrics.jsonl")  # written by process 0 alone
    one = one_process_run[1].history
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=2e-5)


def test_their_checkpoint_resumes_in_one_process(preempted_pair, one_process_run, tmp_path):
    """Written by 2 processes (state shards and a data position per stream), read by 1."""
    final = preempted_pair[0] / "checkpoints" / str(STEPS) / "data"
    streams = sorted(p.name for p in final.glob("stream_*"))
    assert streams == ["stream_0-of-2.json", "stream_1-of-2.json"]
    longer = load_config(None, [*ARGS, f"train.steps={STEPS + 4}"])  # same data, 4 more
    resumed = {}
    for name, run_dir in {"two": preempted_pair[0], "one": one_process_run[0]}.items():
        shutil.copytree(run_dir, tmp_path / name)
        history = train(longer, tmp_path / name, progress=False).history
        resumed[name] = [(r["step"], r["loss"]) for r in history]
    steps, losses = zip(*resumed["two"], strict=True)
    assert steps == tuple(range(STEPS + 1, STEPS + 5))
    np.testing.assert_allclose(losses, [loss for _, loss in resumed["one"]], atol=2e-5)


def test_each_process_reads_only_its_streams(one_process_run):
    """The streams a process owns are its share; side by side they are the 1-process batch."""
    config = load_config(None, ARGS)
    docs, _ = split_documents(read_documents(config.data.path), config.data.eval_fraction)
    tokenizer = load_tokenizer(one_process_run[0] / "tokenizer.model")
    kw = dict(seq_len=64, seed=0, num_streams=4, shuffle=False)
    whole = next(iter(make_dataset(docs, tokenizer, batch_size=8, **kw)))
    shares = [
        make_dataset(docs, tokenizer, batch_size=4, process_index=i, process_count=2, **kw)
        for i in range(2)
    ]
    halves = [next(iter(share)) for share in shares]
    for key in whole:
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    # Process 1 owns streams 2 and 3: documents 2, 3, 6, 7, ... and nothing else.
    first = [BOS_ID, *tokenizer.encode(docs[2])]
    np.testing.assert_array_equal(halves[1]["inputs"][0, : len(first)], first)
    assert owned_streams(4, 1, 2) == [2, 3] and owned_streams(0, 1, 2) == [1]
    with pytest.raises(JaxlmError, match="'data.streams': 3 streams cannot be shared evenly"):
        owned_streams(3, 0, 2)


def test_coordinator_needs_process_count_and_id():
    config = load_config(None, ["distributed.coordinator=10.0.0.1:1234"]).distributed
    with pytest.raises(JaxlmError, match="distributed.num_processes and distributed.process_id"):
        resolve(config, {})
    assert resolve(config, {"JAXLM_NUM_PROCESSES": "4", "JAXLM_PROCESS_ID": "3"}) == (
        "10.0.0.1:1234",
        4,
        3,
    )


def test_data_position_is_saved_per_stream(one_process_run, tmp_path):
    """2 processes' stream files restore 1 process's iterator; so does grain's old file."""
    from etils import epath

    from jaxlm.data.checkpointing import StreamsHandler, StreamsRestore, StreamsSave

    config = load_config(None, ARGS)
    docs, _ = split_documents(read_documents(config.data.path), config.data.eval_fraction)
    tokenizer = load_tokenizer(one_process_run[0] / "tokenizer.model")
    kw = dict(seq_len=64, seed=0, num_streams=2)
    handler, directory = StreamsHandler(), epath.Path(tmp_path)
    for i in range(2):  # what each of two processes writes after 3 batches
        it = iter(
            make_dataset(docs, tokenizer, batch_size=4, process_index=i, process_count=2, **kw)
        )
        [next(it) for _ in range(3)]
        handler.save(directory, args=StreamsSave(it))
    single = iter(make_dataset(docs, tokenizer, batch_size=8, **kw))
    handler.restore(directory, args=StreamsRestore(single))
    reference = iter(make_dataset(docs, tokenizer, batch_size=8, **kw))
    [next(reference) for _ in range(3)]
    expected, got = next(reference), next(single)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])

    # A checkpoint from before streams: grain's file for this process's only stream.
    one = iter(make_dataset(docs, tokenizer, batch_size=8, seq_len=64, seed=0))
    next(one)
    old = tmp_path / "old"
    old.mkdir()
    (old / "process_0-of-1.json").write_text(json.dumps(one.get_state()["streams"]["0"]))
    fresh = iter(make_dataset(docs, tokenizer, batch_size=8, seq_len=64, seed=0))
    handler.restore(epath.Path(old), args=StreamsRestore(fresh))
    np.testing.assert_array_equal(next(fresh)["inputs"], next(one)["inputs"])
    with pytest.raises(JaxlmError, match="no position for data stream 0 of 3"):
        handler.restore(
            directory,
            args=StreamsRestore(
                iter(make_dataset(docs, tokenizer, batch_size=9, seq_len=64, seed=0, num_streams=3))
            ),
        )


def test_a_lone_process_stays_alone():
    """Here JAX is in use already (pytest made its 8 devices): too late to join a cluster."""
    from jaxlm.config import DistributedConfig
    from jaxlm.distributed import initialize

    assert initialize(DistributedConfig(mode="off")) is False
    assert initialize(DistributedConfig(mode="auto"), env={}) is False
    with pytest.raises(JaxlmError, match="must run before JAX is used"):
        initialize(DistributedConfig(mode="on"), env={})
    script = (
        "from jaxlm.config import DistributedConfig\n"
        "from jaxlm.distributed import initialize\n"
        "assert initialize(DistributedConfig(mode='auto'), env={}) is False\n"
        "try:\n"
        "    initialize(DistributedConfig(mode='on'), env={})\n"
        "except Exception as err:\n"
        "    print(err)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'distributed.mode': on, but no cluster was detected" in out.stdout


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes_exactly(
    preempted_pair,
):
    """JAX's preemption service tells every process; orbax's sync point picks one step
    for all of them, so the pair saves it together and exits with code 75. The resumed
    pair's losses are checked against one process in test_two_processes_match_one."""
    run_dir, results, resumed = preempted_pair
    assert [r.returncode for r in results] == [PREEMPTED_EXIT_CODE] * 2, results[1].stderr[-3000:]
    match = re.search(r"preempted at step (\d+)", results[0].stderr)
    assert match, results[0].stderr[-3000:]
    step = int(match.group(1))
    assert 3 <= step < STEPS
    assert (run_dir / "checkpoints" / str(step) / "jaxlm_manifest.json").is_file()
    streams = sorted(
        p.name for p in (run_dir / "checkpoints" / str(step) / "data").glob("stream_*")
    )
    assert streams == ["stream_0-of-2.json", "stream_1-of-2.json"]  # both processes saved
    assert [r.returncode for r in resumed] == [0, 0], resumed[1].stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/{step}" in resumed[0].stdout
