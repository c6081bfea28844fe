"""Hugging Face `tokenizer.json` tokenizers (GPT-2's byte-level BPE, BERT's WordPiece,
anything the `tokenizers` package reads) behind the sentencepiece-processor interface
the rest of jaxlm uses.

Special tokens follow transformers: the tokenizer class's defaults (GPT-2's
`<|endoftext|>`, BERT's `[CLS]`...), overridden by `tokenizer_config.json`, overridden
by `special_tokens_map.json`. A token the tokenizer lacks has id -1, as a disabled
sentencepiece special does.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils
from tokenizers import Tokenizer

from jaxlm.errors import JaxlmError

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# transformers >= 4.50 saves the chat template here; before, in tokenizer_config.json.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "mask_token",
    "cls_token",
    "sep_token",
)
# What transformers' tokenizer classes use when their files don't say.
CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "GPT2Tokenizer": dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>"),
    "BertTokenizer": {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    },
}


def _content(value: Any) -> str | None:
    """A special token as the files store it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(directory: str | os.PathLike) -> dict[str, str | None]:
    """{"bos_token": "<s>", ...} as transformers would resolve them for `directory`."""
    directory = epath.Path(directory)
    files = [directory / name for name in CONFIG_FILES]
    loaded = [json.loads(f.read_text()) if f.is_file() else {} for f in files]
    cls = str(loaded[0].get("tokenizer_class") or "").removesuffix("Fast")
    tokens: dict[str, str | None] = dict(CLASS_DEFAULTS.get(cls, {}))
    for source in loaded:
        tokens |= {key: _content(source[key]) for key in SPECIAL_KEYS if key in source}
    return tokens


def chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template transformers would use for `directory`: `chat_template.jinja`,
    else `tokenizer_config.json`'s `chat_template` (a string, or a list of named
    templates whose `default` is taken); None when there is none."""
    directory = epath.Path(directory)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text()
    config = directory / CONFIG_FILES[0]
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` with sentencepiece's method names.

    `encode` adds no special tokens (jaxlm's data pipeline adds BOS/EOS itself);
    `decode` drops them, as sentencepiece drops control pieces. `chat_template` is the
    directory's (see `chat_template`), for supervised fine-tuning on conversations.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        specials: dict[str, str | None],
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.specials = specials
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's character span, as `apply_chat_template` tokenizes."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def special_token_strings(self) -> dict[str, str]:
        """The named special tokens that are set, as transformers' `special_tokens_map`
        (what chat templates see as `bos_token`, `eos_token`, ...)."""
        return {key: token for key, token in self.specials.items() if token is not None}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def get_piece_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _special_id(self, key: str) -> int:
        token = self.specials.get(key)
        found = self.tokenizer.token_to_id(token) if token else None
        return -1 if found is None else found

    def bos_id(self) -> int:
        return self._special_id("bos_token")

    def eos_id(self) -> int:
        return self._special_id("eos_token")

    def pad_id(self) -> int:
        return self._special_id("pad_token")

    def unk_id(self) -> int:
        return self._special_id("unk_token")

    def mask_id(self) -> int:
        return self._special_id("mask_token")

    def cls_id(self) -> int:
        return self._special_id("cls_token")

    def sep_id(self) -> int:
        return self._special_id("sep_token")

    def piece_to_id(self, piece: str) -> int:
        found = self.tokenizer.token_to_id(piece)
        return self.unk_id() if found is None else found

    def id_to_piece(self, index: int) -> str:
        return self.tokenizer.id_to_token(int(index)) or ""


def load_hf_tokenizer(directory: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a directory holding `tokenizer.json` (and its config files)."""
    path = epath.Path(directory) / TOKENIZER_JSON
    if not path.is_file():
        raise JaxlmError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_str(path.read_text())
    except Exception as err:  # tokenizers raises plain Exceptions for bad files
        raise JaxlmError(f"{path} is not a tokenizers tokenizer.json: {err}") from None
    return HFTokenizer(tokenizer, special_tokens(directory), chat_template(directory))


def copy_hf_tokenizer(source: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Copy `tokenizer.json` (the file or its directory) and the config files next to
    it into `directory`; returns the names copied."""
    source = epath.Path(source)
    folder = source.parent if source.name == TOKENIZER_JSON else source
    load_hf_tokenizer(folder)  # fail early on a missing or bad file
    copied = []
    for name in (TOKENIZER_JSON, *CONFIG_FILES, CHAT_TEMPLATE_FILE):
        if (folder / name).is_file():
            (epath.Path(directory) / name).write_bytes((folder / name).read_bytes())
            copied.append(name)
    return copied


def prepare_hf_tokenizer(source: str | os.PathLike, run_dir: str | os.PathLike) -> HFTokenizer:
    """A run's tokenizer from `tokenizer.path` naming a tokenizer.json: copied into the
    run directory once, by process 0, as the trainer does with sentencepiece models."""
    run_dir = epath.Path(run_dir)
    if jax.process_index() == 0 and not (run_dir / TOKENIZER_JSON).is_file():
        copy_hf_tokenizer(source, run_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm: tokenizer written")
    return load_hf_tokenizer(run_dir)
