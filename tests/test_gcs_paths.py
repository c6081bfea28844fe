"""gs:// paths for data, tokenizers, configs, metrics and checkpoint manifests.

Cloud Storage can't be reached from CI, so an in-memory fsspec filesystem stands in
for gcsfs under the `gs` scheme: etils.epath (what jaxlm, orbax and grain use) talks
to it exactly as it would to gcsfs. What this can't cover is tensorstore's own GCS
driver, which writes orbax's array files; that part is orbax's.
"""

import fsspec
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from jaxlm import integrity
from jaxlm.config import load_config, to_yaml
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import cached_tokenizer, load_tokenizer
from jaxlm.errors import JaxlmError
from jaxlm.paths import as_path, glob_files
from jaxlm.train.metrics import MetricsWriter, read_metrics

from .conftest import CORPUS


class FakeGCS(MemoryFileSystem):
    """MemoryFileSystem answering to gs:// (gcsfs's scheme) with its own store."""

    protocol = ("gs", "gcs")
    store: dict = {}  # noqa: RUF012  (fsspec's class-level store)
    pseudo_dirs = [""]  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for scheme in ("gs://", "gcs://"):
            path = path.removeprefix(scheme)
        return "/" + path.lstrip("/").rstrip("/")


@pytest.fixture
def gcs():
    saved = {k: fsspec.registry.get(k) for k in ("gs", "gcs")}
    for scheme in ("gs", "gcs"):
        fsspec.register_implementation(scheme, FakeGCS, clobber=True)
    fsspec.filesystem("gs").store.clear()
    fsspec.filesystem("gs").pseudo_dirs[:] = [""]
    yield epath.Path("gs://bucket")
    for scheme, impl in saved.items():
        if impl is not None:
            fsspec.register_implementation(scheme, impl, clobber=True)


def test_gs_paths_keep_their_scheme():
    assert str(as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert as_path("runs/x").is_absolute()


def test_read_documents_from_gs_file_directory_and_glob(gcs):
    text = CORPUS.read_text()[:5000]
    (gcs / "corpus" / "a").mkdir(parents=True, exist_ok=True)
    (gcs / "corpus" / "a" / "one.txt").write_text(text)
    (gcs / "corpus" / "two.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    expected = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    assert list(read_documents("gs://bucket/corpus/a/one.txt")) == expected
    assert list(read_documents("gs://bucket/corpus")) == [*expected, "hello", "world"]
    assert list(read_documents("gs://bucket/corpus/*.jsonl")) == ["hello", "world"]
    assert [str(p) for p in glob_files("gs://bucket/corpus/*/*.txt")] == [
        "gs://bucket/corpus/a/one.txt"
    ]
    with pytest.raises(JaxlmError, match="no data files found"):
        read_documents("gs://bucket/nothing/*.txt")


def test_tokenizer_and_config_round_trip_through_gs(gcs, tiny_config):
    docs = read_documents(str(CORPUS))[:400]
    target = gcs / "run" / "tokenizer.model"
    cached_tokenizer(docs, target, 512, "bpe")
    sp = load_tokenizer(target)
    assert sp.get_piece_size() == 512
    assert sp.decode(sp.encode("ROMEO: hello")) == "ROMEO: hello"

    (gcs / "run" / "config.yaml").write_text(to_yaml(tiny_config))
    assert load_config(gcs / "run" / "config.yaml") == tiny_config


def test_metrics_on_gs_are_rewritten_whole_and_survive_a_resume(gcs):
    path = gcs / "run" / "metrics.jsonl"
    writer = MetricsWriter(path, remote_every=3600)
    writer.write({"step": 1})  # the first write flushes (no flush yet)
    writer.write({"step": 2})  # held until close: object stores can't append
    assert read_metrics(path) == [{"step": 1}]
    writer.close()
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    resumed = MetricsWriter(path)
    resumed.write({"step": 3})
    resumed.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_manifests_verify_checkpoint_files_on_gs(gcs):
    step_dir = gcs / "run" / "checkpoints" / "10"
    (step_dir / "state").mkdir(parents=True, exist_ok=True)
    (step_dir / "state" / "a.bin").write_bytes(b"x" * 100)
    (step_dir / "data.json").write_text("{}")
    integrity.write_manifest(step_dir)
    integrity.verify(step_dir, 10)
    (step_dir / "state" / "a.bin").write_bytes(b"x" * 99 + b"y")
    with pytest.raises(integrity.CorruptCheckpoint, match="a.bin: contents altered"):
        integrity.verify(step_dir, 10)


def test_uncommitted_steps_on_gs_are_incomplete(gcs):
    """On object stores orbax writes the step directory in place and commits it with
    commit_success.txt; a step without it is a save that never finished."""
    checkpoints = gcs / "run" / "checkpoints"
    for step in (5, 10):
        (checkpoints / str(step) / "state").mkdir(parents=True, exist_ok=True)
        (checkpoints / str(step) / "state" / "a.bin").write_bytes(b"x")
    (checkpoints / "5" / integrity.COMMIT_FILE).write_text("done")
    assert [p.name for p in integrity.incomplete_steps(checkpoints)] == ["10"]
    assert integrity.uncommitted_dir(checkpoints, 10) == checkpoints / "10"


def test_model_directories_on_gs_load_their_newest_committed_step(gcs):
    """What load_pretrained reads through epath before orbax (which the emulator test
    covers): a gs:// run's newest committed step, passing over an unfinished one, and
    its tokenizer; a Hugging Face directory on gs:// is refused by name."""
    from jaxlm.model_dir import _latest_step, load_tokenizer_dir
    from jaxlm.pretrained import load_pretrained

    checkpoints = gcs / "run" / "checkpoints"
    for step in (5, 10):
        (checkpoints / str(step) / "state").mkdir(parents=True, exist_ok=True)
    (checkpoints / "5" / integrity.COMMIT_FILE).write_text("done")
    assert _latest_step(checkpoints) == 5
    cached_tokenizer(read_documents(str(CORPUS))[:400], gcs / "run" / "tokenizer.model", 512, "bpe")
    assert load_tokenizer_dir(gcs / "run").get_piece_size() == 512

    (gcs / "hf").mkdir(parents=True, exist_ok=True)
    (gcs / "hf" / "config.json").write_text("{}")
    with pytest.raises(JaxlmError, match="^gs://bucket/hf: a Hugging Face directory must be local"):
        load_pretrained("gs://bucket/hf")


def test_tensorboard_events_reach_gs(gcs):
    """tensorboardX writes locally; the events are copied to the gs:// run directory
    (periodically, with what tensorboardX has written by then, and whole on close) and
    read back from there hold what was written."""
    from jaxlm.observe.tensorboard import TensorBoardWriter

    from .test_observe import _events

    writer = TensorBoardWriter(gcs / "run", "name: remote\n", remote_every=3600)
    writer.scalars({"step": 1, "loss": 2.5, "eval_loss": 3.0})
    writer.flush()
    assert (gcs / "run" / "tensorboard").is_dir()
    writer.scalars({"step": 2, "loss": 1.5})
    writer.close()
    events = _events(gcs / "run" / "tensorboard")
    scalars = [e for e in events if not isinstance(e[2], str)]
    assert scalars == [("train/loss", 1, 2.5), ("eval/loss", 1, 3.0), ("train/loss", 2, 1.5)]
    assert any(tag.startswith("config") and "name: remote" in v for tag, _, v in events)
