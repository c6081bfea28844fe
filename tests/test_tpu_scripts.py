"""The tpu/ scripts: valid bash, clean under shellcheck, and --dry-run prints exact commands."""

import os
import shlex
import shutil
import subprocess

import pytest
import yaml

from .conftest import REPO

TPU = REPO / "tpu"
SCRIPTS = sorted(p.name for p in TPU.glob("*.sh"))


def run(script, *args, **env):
    return subprocess.run(
        ["bash", str(TPU / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "JAXLM_TPU_ZONE": "", "JAXLM_TPU_PROJECT": "", **env},
        timeout=60,
    )


def dry_run(script, *args, **env) -> list[str]:
    out = run(script, *args, "--dry-run", **env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_every_script_is_here():
    expected = ["create.sh", "gke.sh", "install.sh", "launch.sh", "lib.sh", "logs.sh", "stop.sh"]
    assert expected == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_parses(script):
    out = subprocess.run(["bash", "-n", str(TPU / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)",
)
def test_shellcheck_is_clean():
    out = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=TPU)
    assert out.returncode == 0, out.stdout


def test_create_dry_run():
    assert dry_run("create.sh", "pod", "--type", "v5p-128", "--zone", "us-east5-a", "--spot") == [
        "gcloud compute tpus queued-resources create pod --node-id=pod --zone=us-east5-a "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot",
        "gcloud compute tpus queued-resources describe pod --zone=us-east5-a "
        "'--format=value(state.state)'",
    ]
    lines = dry_run(
        "create.sh", "e", "--type", "v5litepod-16", "--project", "p", JAXLM_TPU_ZONE="z"
    )
    assert lines[0].endswith(
        "--zone=z --project=p --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"
    )


def test_install_dry_run(tmp_path):
    assert dry_run("install.sh", "pod", "--zone", "z", TMPDIR=str(tmp_path)) == [
        f"git -C {REPO} archive --format=tar.gz -o {tmp_path}/jaxlm-pod.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp {tmp_path}/jaxlm-pod.tar.gz pod:jaxlm.tar.gz "
        "--zone=z --worker=all",
        "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all '--command=rm -rf ~/jaxlm && "
        "mkdir ~/jaxlm && tar xzf ~/jaxlm.tar.gz -C ~/jaxlm && cd ~/jaxlm && "
        'python3 -m pip install --quiet -e ".[tpu]"\'',
    ]


def test_launch_dry_run_quotes_overrides_exactly():
    override = 'train.sample_prompt=It\'s "so"'
    (line,) = dry_run(
        "launch.sh", "pod", "--zone", "z", "configs/llama-7b.yaml", override, "--run-dir", "r"
    )
    words = shlex.split(line)
    assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z"]
    assert words[7] == "--worker=all" and words[8].startswith("--command=")
    remote = shlex.split(words[8].removeprefix("--command="))  # what each worker's shell runs
    start = remote.index("(nohup")
    assert remote[start + 1 : start + 8] == [
        "jaxlm",
        "train",
        "configs/llama-7b.yaml",
        override,
        "--run-dir",
        "r",
        "--no-progress",
    ]
    assert "~/jaxlm-train.pid)" in remote


def test_logs_and_stop_dry_run():
    assert dry_run("logs.sh", "pod", "--zone", "z", "--worker", "3") == [
        "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=3 "
        "'--command=tail -n 100 -F ~/jaxlm-train.log'"
    ]
    assert dry_run("stop.sh", "pod", "--zone", "z", "--delete") == [
        "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all '--command=test -f "
        '~/jaxlm-train.pid && kill -TERM "$(cat ~/jaxlm-train.pid)" || true\'',
        "gcloud compute tpus queued-resources delete pod --zone=z --force --quiet",
    ]


@pytest.mark.parametrize(
    "tpu_type, topology, hosts, chips_per_host",
    [("v5p-128", "4x4x4", 16, 4), ("v5litepod-16", "4x4", 4, 4), ("v5p-8", "2x2x1", 1, 4)],
)
def test_gke_jobset_dry_run(tpu_type, topology, hosts, chips_per_host):
    args = ["run1", "--type", tpu_type, "--slices", "2", "--image", "img:1", "c.yaml", "a=b c"]
    manifest, command = "\n".join(dry_run("gke.sh", *args)).split("\n---\n")
    assert command == "kubectl apply -f -"
    jobset = yaml.safe_load(manifest)
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "run1"
    (job,) = jobset["spec"]["replicatedJobs"]
    assert job["replicas"] == 2
    assert job["template"]["spec"]["parallelism"] == hosts
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
    (container,) = pod["containers"]
    assert container["command"] == ["jaxlm", "train", "c.yaml", "a=b c", "--no-progress"]
    assert container["resources"]["limits"]["google.com/tpu"] == chips_per_host


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("create.sh", ["pod", "--type", "v5p-8"], "--zone is required"),
        ("create.sh", ["pod", "--zone", "z"], "--type is required"),
        ("create.sh", ["pod", "--zone", "z", "--type", "v9-8"], "no default runtime for v9-8"),
        ("launch.sh", ["pod", "--zone", "z"], "usage: launch.sh"),
        ("gke.sh", ["r", "--type", "v5p-12", "--image", "i", "c.yaml"], "not a power-of-two"),
    ],
)
def test_mistakes_are_refused(script, args, message):
    out = run(script, *args, "--dry-run")
    assert out.returncode == 2 and message in out.stderr and not out.stdout
