"""gs:// end to end against a Cloud Storage API: `gcp-storage-emulator` (the test
extra) serves it on a loopback port. gcsfs (etils.epath: jaxlm's files, orbax's
directories and commit files) finds it through STORAGE_EMULATOR_HOST, tensorstore's
GCS driver (orbax's array files) through TENSORSTORE_GCS_HTTP_URL, with
GOOGLE_AUTH_TOKEN_FOR_TESTING standing in for credentials. Everything on gs:// runs in
subprocesses, so this process's gs:// filesystem is left alone; the test itself only
lists objects through the storage API.

The emulator lacks two things Cloud Storage has, which the fixture adds (LAUNCHER):
- the `x-goog-generation` header on downloads, which tensorstore's GCS driver parses
  on every read ("Malformed StorageGeneration" otherwise: orbax's OCDBT manifest is
  read back while saving);
- `objects.moveTo`, with which gcsfs renames (the checkpoint manifest is written
  under a temporary name, then renamed): gcsfs retries the emulator's 501 for about
  36 s before it copies and deletes instead, so each save took 36 s longer than on
  Cloud Storage (most of the minutes this test once took).
gcsfs's bucket-layout lookup goes to the Storage Control gRPC API, which neither the
emulator nor STORAGE_EMULATOR_HOST covers: it fails without credentials and gcsfs
falls back to its plain filesystem on every call, so the env turns the lookup off
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false) and goes to that filesystem at once.
"""

import json
import math
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.train.faults import KILL_BEFORE_COMMIT_ENV

from .conftest import REPO, TINY, subprocess_env

pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator: the test extra")

LAUNCHER = """
import sys, threading
from http import HTTPStatus
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

plain = objects.download

def download(request, response, storage, *args, **kwargs):
    plain(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]

def move(request, response, storage, *args, **kwargs):
    bucket, source, dest = (request.params[k] for k in ("bucket_name", "object_id", "to"))
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, dest)
        storage.delete_file(bucket, source)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)

objects.download = download  # before the server module builds its routes
from gcp_storage_emulator import server as emulator

OBJECT = r"^/storage/v1/b/(?P<bucket_name>[-.\\w]+)/o/(?P<object_id>.*[^/]+)"
MOVE = OBJECT + r"/moveTo/o/(?P<to>.*[^/]+)$"
emulator.HANDLERS = ((MOVE, {"POST": move}), *emulator.HANDLERS)  # read on each request
server = emulator.create_server(
    "127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="bucket"
)
server.start()
threading.Event().wait()
"""

# Checkpoints and evals at steps 2 and 4. The params are sharded 8 ways (FSDP), as on
# a pod: each array goes to gs:// as 8 shards. (Replicated, orbax would split each
# copy into slices for the devices to write, 80 slice programs per saving process.)
TRAIN = [*TINY, "train.steps=4", "checkpoint.every=2", "train.eval_every=2", "mesh.fsdp=8"]
RUN = "gs://bucket/run"
# The reference, on local disk, runs in this process: its XLA flags are those that
# conftest's `subprocess_env` gives the runs on gs://, so its numbers are bit for bit
# theirs, and its compiles fill the cache that they then read.


@pytest.fixture(scope="module")
def gcs_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:  # up once it answers
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/bucket", timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                server.kill()
                raise
            time.sleep(0.2)
    yield subprocess_env(
        STORAGE_EMULATOR_HOST=url,
        TENSORSTORE_GCS_HTTP_URL=url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    )
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


def run(env, *args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args],
        cwd=REPO,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def gs(env, code: str) -> str:
    """Run `code` (with `epath` imported) in a subprocess against the emulator."""
    out = subprocess.run(
        [sys.executable, "-c", f"from etils import epath\n{code}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def objects(env, prefix: str) -> list[str]:
    """The bucket's object names under `prefix`, as the storage API lists them."""
    query = urllib.parse.urlencode({"prefix": prefix})
    url = f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/bucket/o?{query}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return [item["name"] for item in json.load(response).get("items", [])]


def by_step(metrics_jsonl: str, key: str) -> dict[int, float]:
    """step -> `key` of a metrics.jsonl; a step logged twice (resumed) counts as last."""
    records = [json.loads(line) for line in metrics_jsonl.splitlines() if line.strip()]
    return {r["step"]: r[key] for r in records if key in r}


def train_args(run_dir: str, *overrides: str) -> list[str]:
    config = ["configs/shakespeare.yaml", *TRAIN, *overrides]
    return ["train", *config, "--no-progress", "--run-dir", run_dir]


# After the resume, in one subprocess: the params as load_pretrained reads them (from
# the gs:// run, from a gs:// model directory that save_pretrained writes of it, and
# from the local reference) by tree path; the run's metrics; and one object of step 4
# with a byte flipped.
AFTER_RESUME = """
import json, jax, numpy as np
from jaxlm.paths import walk_files
from jaxlm.pretrained import load_pretrained, save_pretrained

run, model = epath.Path("{run}"), epath.Path("{run}-model")
loaded = load_pretrained(run)
save_pretrained(model, loaded.config, loaded.params)
(model / "tokenizer.model").write_bytes((run / "tokenizer.model").read_bytes())
for name, path in (("run", run), ("model", model), ("ref", "{ref}")):
    params = jax.tree_util.tree_flatten_with_path(load_pretrained(path).params)[0]
    np.savez(f"{out}/{{name}}.npz", **{{jax.tree_util.keystr(k): np.asarray(v) for k, v in params}})
metrics = (run / "metrics.jsonl").read_text()
victim = max(walk_files(run / "checkpoints/4/state"), key=lambda p: p.stat().length)
data = victim.read_bytes()
victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
print(json.dumps({{"metrics": metrics, "victim": str(victim)}}))
"""


def test_a_gs_run_survives_a_crash_and_eval_and_load_pretrained_read_it(
    gcs_env, tmp_path, monkeypatch, capsys
):
    ref_dir = tmp_path / "ref"  # the uninterrupted reference, on local disk
    monkeypatch.chdir(REPO)
    code = main(train_args(str(ref_dir)))
    assert code == 0, capsys.readouterr().err[-2000:]
    ref_metrics = (ref_dir / "metrics.jsonl").read_text()

    # Killed once step 4's files and manifest are on gs://, before orbax commits it.
    killed = run(gcs_env, *train_args(RUN), **{KILL_BEFORE_COMMIT_ENV: "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    step4 = objects(gcs_env, "run/checkpoints/4/")
    assert "run/checkpoints/4/jaxlm_manifest.json" in step4
    assert "run/checkpoints/4/commit_success.txt" not in step4

    # eval reads the run from gs://, passing over the unfinished step 4: its loss is
    # the reference's eval loss at step 2, on the same two held-out batches.
    report = tmp_path / "eval.json"
    evaluated = run(gcs_env, "eval", RUN, "--max-batches", "2", "--json", str(report))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"{RUN} on " in evaluated.stdout and "perplexity" in evaluated.stdout
    results = json.loads(report.read_text())
    eval_loss = by_step(ref_metrics, "eval_loss")[2]
    assert results["loss"] == pytest.approx(eval_loss, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(eval_loss), rel=1e-5)

    resumed = run(gcs_env, *train_args(RUN))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping incomplete checkpoint 4 (a save that never finished)" in resumed.stdout
    assert f"resumed from {RUN}/checkpoints/2" in resumed.stdout

    # Resumed exactly: the uninterrupted run's losses and params, which load_pretrained
    # reads from gs:// (the run, and a model directory saved there) as from local disk.
    out = gs(gcs_env, AFTER_RESUME.format(run=RUN, ref=ref_dir, out=tmp_path))
    after = json.loads(out.strip().splitlines()[-1])
    got_loss, want_loss = by_step(after["metrics"], "loss"), by_step(ref_metrics, "loss")
    assert {s: got_loss[s] for s in (3, 4)} == {s: want_loss[s] for s in (3, 4)}
    want = np.load(tmp_path / "ref.npz")
    for source in ("run", "model"):
        got = np.load(tmp_path / f"{source}.npz")
        assert sorted(got.files) == sorted(want.files)
        for name in want.files:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{source}: {name}")

    corrupt = run(gcs_env, *train_args(RUN, "train.steps=5"))
    assert corrupt.returncode == 2, corrupt.stderr[-2000:]
    problem = f"{after['victim']}: contents altered (SHA-256 mismatch)"
    assert f"checkpoint step 4 is corrupt: {problem}" in corrupt.stderr


# Lazy sources on gs:// (issue #21): Parquet row groups, and text and JSONL through their
# byte-offset index (kept in the local cache), read by index from the bucket.
LAZY_SOURCES = """
import io, json
import pyarrow as pa, pyarrow.parquet as pq
from jaxlm.data.sources import read_documents

root = epath.Path("gs://bucket/corpus")
parquet = io.BytesIO()
pq.write_table(pa.table({{"text": {docs}}}), parquet, row_group_size=2)
(root / "a.parquet").write_bytes(parquet.getvalue())
(root / "b.jsonl").write_text("".join(json.dumps({{"text": d}}) + "\\n" for d in {docs}))
(root / "c.txt").write_text("\\n\\n".join({docs}))
docs = read_documents(str(root))
print(json.dumps([docs[i] for i in reversed(range(len(docs)))]))
"""


def test_lazy_sources_read_gs(gcs_env):
    docs = ["one", "two words", "thrée", "four\nlines", "five"]
    out = gs(gcs_env, LAZY_SOURCES.format(docs=repr(docs)))
    assert json.loads(out) == list(reversed(docs * 3))
