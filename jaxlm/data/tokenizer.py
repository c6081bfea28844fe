"""SentencePiece tokenizers: trained from the corpus on first use, then cached.

The cache key is the corpus content plus the tokenizer settings, so a changed corpus
or vocab size never reuses a stale model. Newline is a token of its own and no
normalisation is applied, so decoding gives back the text exactly.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from etils import epath

from jaxlm.errors import JaxlmError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"  # a run directory's copy of its tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLM_CACHE_DIR", Path.home() / ".cache" / "jaxlm"))


def train_tokenizer(
    documents: Sequence[str],
    out_path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    extra_symbols: Sequence[str] = (),
) -> epath.Path:
    """Train a sentencepiece model on `documents` and write it to `out_path`.

    `extra_symbols` become pieces of their own that text never splits (BERT's `<mask>`).
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=model_type in ("bpe", "unigram"),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", *extra_symbols],
            split_digits=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            max_sentence_length=1 << 20,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise JaxlmError(f"tokenizer training failed: {err}") from None
    out_path = epath.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return out_path


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A sentencepiece model from a local or gs:// file."""
    path = epath.Path(path)
    if not path.is_file():
        raise JaxlmError(f"tokenizer file not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(path.read_bytes())
    except (OSError, RuntimeError):
        raise JaxlmError(f"tokenizer file {path} is not a sentencepiece model") from None
    return sp


def corpus_key(
    documents: Sequence[str], vocab_size: int, model_type: str, extra_symbols: Sequence[str] = ()
) -> str:
    extra = f":{','.join(extra_symbols)}" if extra_symbols else ""
    h = hashlib.sha256(f"{vocab_size}:{model_type}:{len(documents)}{extra}".encode())
    for doc in documents:
        h.update(doc.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def cached_tokenizer(
    documents: Sequence[str],
    out_path: str | os.PathLike,
    vocab_size: int,
    model_type: str,
    extra_symbols: Sequence[str] = (),
) -> epath.Path:
    """Copy a cached model for this corpus to `out_path`, training it if needed."""
    key = corpus_key(documents, vocab_size, model_type, extra_symbols)
    cached = cache_dir() / "tokenizers" / f"{key}.model"
    if not cached.is_file():
        train_tokenizer(documents, cached, vocab_size, model_type, extra_symbols)
    out_path = epath.Path(out_path)  # may be in a gs:// run directory
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(cached.read_bytes())
    return out_path


def run_tokenizer(
    tok: Any,
    run_dir: epath.Path,
    corpus: Callable[[], Sequence[str]],
    symbols: Sequence[str] = (),
    default: epath.Path | None = None,
) -> Any:
    """A run's tokenizer (`tok` is its TokenizerConfig): the run dir's copy, else
    `tok.path`, else `default` (token shards' own), else one trained on `corpus()`,
    which is read only then (a sample of the documents).

    Process 0 writes it and the others wait, so hosts sharing a run directory never
    race on the file or end up with different tokenizers.
    """
    import jax
    from jax.experimental import multihost_utils

    if tok.path.endswith(".json"):  # a Hugging Face tokenizer.json
        from jaxlm.data.hf_tokenizer import prepare_hf_tokenizer

        return prepare_hf_tokenizer(tok.path, run_dir)
    local = run_dir / TOKENIZER_FILE
    if jax.process_index() == 0 and not local.is_file():
        source = epath.Path(tok.path) if tok.path else default
        if source is not None:
            load_tokenizer(source)  # fail early on a bad file
            local.write_bytes(source.read_bytes())
        else:
            cached_tokenizer(corpus(), local, tok.vocab_size, tok.model_type, symbols)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm: tokenizer written")
    return load_tokenizer(local)
