"""Typed, frozen run configuration: YAML presets plus `key=value` overrides.

OmegaConf does the merging and type checking against the dataclasses below, so an
unknown key or a value of the wrong type is caught before anything expensive runs;
`validate` adds the range checks that types cannot express.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from jaxlm.errors import ConfigError, JaxlmError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. `vocab_size` left at 0 takes the tokenizer's size."""

    family: str = "gpt2"
    vocab_size: int = 0
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0  # 0 = 4 * d_model
    max_len: int = 1024
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TokenizerConfig:
    """A sentencepiece model: `path` if given, else trained from the corpus."""

    path: str = ""
    vocab_size: int = 1024
    model_type: str = "bpe"  # bpe | unigram | char | word


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/tinyshakespeare.txt"  # a file, a directory or a glob
    text_field: str = "text"  # for JSONL
    split: str = "paragraph"  # how .txt files become documents: paragraph | line | file
    eval_fraction: float = 0.1  # the last documents, held out
    shuffle: bool = True


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global, in rows of seq_len tokens
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the device kind
    sample_tokens: int = 200  # generated at the end of training; 0 = none
    sample_prompt: str = ""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    async_save: bool = True


def _default_rules() -> dict[str, list[str]]:
    # Precedence is the order here; a mesh axis is used at most once per array.
    return {
        "batch": ["data", "fsdp"],
        "vocab": ["tensor"],
        "heads": ["tensor"],
        "mlp": ["tensor"],
        "embed": ["fsdp"],
        "length": [],
        "head_dim": [],
        "layers": [],
        "max_len": [],
    }


MESH_AXES = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class MeshConfig:
    """Device counts per mesh axis (-1 = the devices left) and logical rules."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, list[str]] = field(default_factory=_default_rules)


@dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def replace(self, **sections: Any) -> Config:
        """Copy with some fields changed, e.g. `cfg.replace(train={'steps': 5})`."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if isinstance(value, dict) and dataclasses.is_dataclass(current):
                value = dataclasses.replace(current, **value)
            changes[name] = value
        return validate(dataclasses.replace(self, **changes))


def _rephrase(err: oc_errors.OmegaConfBaseException, source: str) -> ConfigError:
    key = str(getattr(err, "full_key", "") or "?")
    if isinstance(err, oc_errors.ConfigKeyError):
        return ConfigError(key, f"unknown key (from {source})")
    value = getattr(err, "value", None)
    return ConfigError(key, f"invalid value {value!r}, expected {_field_type(key)} (from {source})")


def _field_type(key: str) -> str:
    """The declared type of a dotted key, for error messages."""
    kind: Any = Config
    for part in key.split("."):
        fields = (
            {f.name: f.type for f in dataclasses.fields(kind)}
            if dataclasses.is_dataclass(kind)
            else {}
        )
        if part not in fields:
            return "another type"
        kind = fields[part]
        kind = globals().get(kind, kind) if isinstance(kind, str) else kind
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a YAML preset, apply `key=value` overrides, type- and range-check."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise JaxlmError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in several types
            raise JaxlmError(f"config file {path} is not valid YAML: {err}") from None
        if "name" not in loaded:
            loaded["name"] = path.stem
        try:
            merged = OmegaConf.merge(merged, loaded)
        except oc_errors.OmegaConfBaseException as err:
            raise _rephrase(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise JaxlmError(f"override {item!r} is not of the form key=value")
        key, _, value = item.partition("=")
        try:
            if _field_type(key) == "str":  # keep text such as `ROMEO:` literal, not YAML
                nested: Any = value.strip("'\"")
                for part in reversed(key.split(".")):
                    nested = {part: nested}
                merged = OmegaConf.merge(merged, OmegaConf.create(nested))
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except oc_errors.OmegaConfBaseException as err:
            raise _rephrase(err, f"override {item!r}") from None
    try:
        config = OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as err:
        raise _rephrase(err, "config") from None
    return validate(config)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(c: Config) -> Config:
    """Range and consistency checks that the dataclass types can't express."""
    m, t, o = c.model, c.train, c.optim
    _check(m.family == "gpt2", "model.family", f"unknown family {m.family!r}; known: gpt2")
    for key in ("d_model", "n_layers", "n_heads", "max_len"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    _check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = tokenizer's size)")
    _check(m.d_ff >= 0, "model.d_ff", "must be >= 0 (0 = 4 * d_model)")
    _check(
        m.d_model % m.n_heads == 0,
        "model.n_heads",
        f"d_model {m.d_model} is not divisible by n_heads {m.n_heads}",
    )
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
    _check(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
    _check(m.remat in ("none", "full", "dots"), "model.remat", "must be none, full or dots")
    tok = c.tokenizer
    _check(tok.vocab_size >= 16, "tokenizer.vocab_size", "must be at least 16")
    _check(
        tok.model_type in ("bpe", "unigram", "char", "word"),
        "tokenizer.model_type",
        "must be bpe, unigram, char or word",
    )
    _check(
        m.vocab_size == 0 or m.vocab_size >= tok.vocab_size,
        "model.vocab_size",
        f"{m.vocab_size} is smaller than tokenizer.vocab_size {tok.vocab_size}",
    )
    _check(bool(c.data.path), "data.path", "must name a file, directory or glob")
    _check(
        c.data.split in ("paragraph", "line", "file"),
        "data.split",
        "must be paragraph, line or file",
    )
    _check(0.0 < c.data.eval_fraction < 1.0, "data.eval_fraction", "must be in (0, 1)")
    for key in (
        "steps",
        "batch_size",
        "seq_len",
        "log_every",
        "eval_every",
        "eval_batches",
    ):
        _check(getattr(t, key) > 0, f"train.{key}", "must be positive")
    _check(
        t.seq_len <= m.max_len,
        "train.seq_len",
        f"{t.seq_len} exceeds model.max_len {m.max_len}",
    )
    _check(t.sample_tokens >= 0, "train.sample_tokens", "must be >= 0")
    _check(t.peak_tflops >= 0, "train.peak_tflops", "must be >= 0")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", "b1 and b2 must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
    _check(c.checkpoint.every > 0, "checkpoint.every", "must be positive")
    _check(c.checkpoint.keep > 0, "checkpoint.keep", "must be positive")
    for axis in MESH_AXES:
        size = getattr(c.mesh, axis)
        _check(size == -1 or size > 0, f"mesh.{axis}", "must be positive or -1")
    _check(
        [getattr(c.mesh, a) for a in MESH_AXES].count(-1) <= 1,
        "mesh",
        "at most one axis may be -1",
    )
    for name, axes in c.mesh.rules.items():
        for axis in axes:
            _check(axis in MESH_AXES, f"mesh.rules.{name}", f"unknown mesh axis {axis!r}")
    return c
