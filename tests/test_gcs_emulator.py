"""gs:// end to end against a Cloud Storage API: `gcp-storage-emulator` (the test
extra) serves it on a loopback port. gcsfs (etils.epath: jaxlm's files, orbax's
directories and commit files) finds it through STORAGE_EMULATOR_HOST, tensorstore's
GCS driver (orbax's array files) through TENSORSTORE_GCS_HTTP_URL, with
GOOGLE_AUTH_TOKEN_FOR_TESTING standing in for credentials. Everything runs in
`jaxlm` subprocesses, so this process's gs:// filesystem is left alone.

The emulator's downloads lack the `x-goog-generation` header that Cloud Storage
sends and tensorstore's GCS driver parses on every read ("Malformed
StorageGeneration" otherwise: orbax's OCDBT manifest is read back while saving), so
the fixture starts it with that header added (LAUNCHER)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from jaxlm.train.faults import KILL_BEFORE_COMMIT_ENV

from .conftest import REPO, TINY

pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator: the test extra")
# Every object goes through the emulator's one Python HTTP server: the test takes
# minutes, too long for the default suite.
pytestmark = pytest.mark.skipif(
    os.environ.get("JAXLM_TEST_GCS_EMULATOR") != "1", reason="set JAXLM_TEST_GCS_EMULATOR=1"
)

LAUNCHER = """
import sys, threading
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

objects.download = download  # before the server module builds its routes
from gcp_storage_emulator.server import create_server

server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="bucket")
server.start()
threading.Event().wait()
"""


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
    yield dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        STORAGE_EMULATOR_HOST=url,
        TENSORSTORE_GCS_HTTP_URL=url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
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
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def losses(text: str) -> dict[int, float]:
    lines = [line for line in text.splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_train_on_gs_survives_a_crash_and_names_a_corrupt_object(gcs_env, tmp_path):
    train = ["train", "configs/shakespeare.yaml", *TINY, "train.steps=8", "checkpoint.every=3"]
    train.append("--no-progress")
    local = run(gcs_env, *train, "--run-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-2000:]

    run_dir = "gs://bucket/run"
    killed = run(gcs_env, *train, "--run-dir", run_dir, **{KILL_BEFORE_COMMIT_ENV: "6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    listing = gs(
        gcs_env,
        f"step = epath.Path('{run_dir}/checkpoints/6')\n"
        "print(sorted(p.name for p in step.iterdir()))",
    )
    assert "jaxlm_manifest.json" in listing and "commit_success.txt" not in listing

    resumed = run(gcs_env, *train, "--run-dir", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping incomplete checkpoint 6 (a save that never finished)" in resumed.stdout
    assert f"resumed from {run_dir}/checkpoints/3" in resumed.stdout
    want = losses((tmp_path / "local" / "metrics.jsonl").read_text())
    got = losses(gs(gcs_env, f"print(epath.Path('{run_dir}/metrics.jsonl').read_text())"))
    assert {s: got[s] for s in range(4, 9)} == {s: want[s] for s in range(4, 9)}

    victim = gs(
        gcs_env,
        f"step = epath.Path('{run_dir}/checkpoints/8')\n"
        "from jaxlm.paths import walk_files\n"
        "files = list(walk_files(step / 'state'))\n"
        "victim = max(files, key=lambda p: p.stat().length)\n"
        "data = victim.read_bytes()\n"
        "victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])\n"
        "print(victim)",
    ).strip()
    corrupt = run(gcs_env, *train, "train.steps=9", "--run-dir", run_dir)
    assert corrupt.returncode == 2, corrupt.stderr[-2000:]
    assert (
        f"checkpoint step 8 is corrupt: {victim}: contents altered (SHA-256 mismatch)"
        in corrupt.stderr
    )
