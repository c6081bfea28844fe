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


# What `model.family` puts in the architecture fields a config leaves empty ("" or null),
# so `model.family=llama` alone turns a GPT-2 preset into a Llama-style one.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "norm": "layernorm",
        "mlp": "gelu",
        "position": "learned",
        "use_bias": True,
        "tie_embeddings": True,
    },
    "llama": {
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "position": "rope",
        "use_bias": False,
        "tie_embeddings": False,
    },
    # Encoder-decoder (models/encdec.py); the trainer doesn't train it yet.
    "t5": {
        "norm": "rmsnorm",
        "mlp": "relu",
        "position": "relative",
        "use_bias": False,
        "tie_embeddings": True,
    },
    # BERT encoder (models/encoder.py): post-LN, exact GELU; the trainer doesn't train it yet.
    "bert": {
        "norm": "layernorm",
        "mlp": "gelu",
        "position": "learned",
        "use_bias": True,
        "tie_embeddings": True,
    },
}
MODEL_CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "relu"),
    "position": ("learned", "rope", "relative"),
    "attention": ("einsum", "dot_product", "flash", "splash"),
}
SWIGLU_MULTIPLE = 256  # Llama rounds its SwiGLU width up to this


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. `vocab_size` left at 0 takes the tokenizer's size.

    `family` (gpt2 | llama, both decoder-only) fills the fields left empty; see
    FAMILY_DEFAULTS. `resolved()` gives the filled-in copy that models use.
    """

    family: str = "gpt2"
    vocab_size: int = 0
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads; fewer = grouped-query, 1 = multi-query
    d_ff: int = 0  # 0 = 4 * d_model (gelu), Llama's 8/3 * d_model rounded up (swiglu)
    max_len: int = 1024
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5  # of LayerNorm or RMSNorm
    norm: str = ""  # layernorm | rmsnorm
    mlp: str = ""  # gelu | swiglu
    position: str = ""  # learned (a table of max_len) | rope (from the packed positions)
    rope_base: float = 10000.0
    use_bias: bool | None = None  # in projections and LayerNorm
    tie_embeddings: bool | None = None
    sliding_window: int = 0  # attend to at most this many latest tokens; 0 = all
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots
    # einsum (reference) | dot_product (jax.nn) | flash | splash (Pallas TPU kernels,
    # interpreted off TPU; seq_len a multiple of 128)
    attention: str = "einsum"
    # Encoder-decoder (t5) only: decoder depth (0 = n_layers; n_layers is the encoder's)
    # and T5's bucketed relative position bias.
    n_decoder_layers: int = 0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    type_vocab_size: int = 2  # bert only: token-type (segment A/B) embedding rows

    def resolved(self) -> ModelConfig:
        """This config with the family's defaults in the empty fields (idempotent)."""
        defaults = FAMILY_DEFAULTS.get(self.family, {})
        empty = {k: v for k, v in defaults.items() if getattr(self, k) in ("", None)}
        return dataclasses.replace(self, **empty) if empty else self

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.resolved().mlp == "swiglu":
            return -(-(8 * self.d_model // 3) // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE
        return 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


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
    # Documents are dealt into this many independently packed streams, shared out among
    # the processes (0 = one per process). Fixed, it makes the global batch, and the
    # checkpointed data position, the same for any number of hosts.
    streams: int = 0


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
    nonfinite: str = "skip"  # a NaN/inf loss or gradient: skip the update, or stop


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
    fallback: bool = False  # resume from an older checkpoint when the newest is corrupt


MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# One logical-rules table per parallelism strategy; `mesh.rules` overrides single names.
# Order is precedence, and flax uses a mesh axis at most once per array, so `embed -> fsdp`
# shards parameters but not activations whose batch already took `fsdp`.
MESH_STRATEGIES: dict[str, dict[str, list[str]]] = {
    "data": {"batch": ["data"]},
    "fsdp": {"batch": ["data", "fsdp"], "embed": ["fsdp"]},
    "fsdp_tensor": {
        "batch": ["data", "fsdp"],
        "vocab": ["tensor"],
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "mlp": ["tensor"],
        "embed": ["fsdp"],
    },
    "fsdp_tensor_sequence": {
        "batch": ["data", "fsdp"],
        "length": ["sequence"],
        "vocab": ["tensor"],
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "mlp": ["tensor"],
        "embed": ["fsdp"],
    },
}
# Names that every strategy lists (unsharded when it doesn't map them), see shared/DESIGN.md.
_LOGICAL_NAMES = ("batch", "length", "vocab", "heads", "kv_heads", "mlp", "embed", "head_dim")
_LOGICAL_NAMES += ("layers", "max_len")
_LOGICAL_NAMES += ("relpos_buckets",)  # T5's relative-bias table rows, never sharded
_LOGICAL_NAMES += ("type_vocab", "classes")  # BERT's token-type rows, NSP classes: unsharded


@dataclass(frozen=True)
class MeshConfig:
    """Device counts per mesh axis (-1 = the devices left) and the logical rules.

    `strategy` picks a rules table from MESH_STRATEGIES; `rules` replaces single
    entries of it (e.g. `mesh.rules.length=[]`), so a strategy is configuration.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    strategy: str = "fsdp_tensor_sequence"
    rules: dict[str, list[str]] = field(default_factory=dict)

    def resolved_rules(self) -> dict[str, list[str]]:
        """The strategy's table with `rules` applied; unnamed axes stay unsharded."""
        table = {name: list(axes) for name, axes in MESH_STRATEGIES[self.strategy].items()}
        for name in _LOGICAL_NAMES:
            table.setdefault(name, [])
        table.update({name: list(axes) for name, axes in self.rules.items()})
        return table


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process JAX (`jax.distributed.initialize`), see jaxlm/distributed.py.

    `auto` initialises when the environment says this is one of several processes (a
    TPU pod slice, a GKE JobSet, SLURM, or JAXLM_* variables); the fields, or the
    JAXLM_COORDINATOR / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID variables, name the
    coordinator explicitly, e.g. for several processes on one machine.
    """

    mode: str = "auto"  # auto | on | off
    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

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
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise JaxlmError(f"config file {path} is not valid YAML{where}: {problem}") from None
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


def validate_model(m: ModelConfig) -> ModelConfig:
    """The model's checks, on the copy with the family's defaults filled in."""
    families = ", ".join(FAMILY_DEFAULTS)
    _check(
        m.family in FAMILY_DEFAULTS,
        "model.family",
        f"unknown family {m.family!r}; known: {families}",
    )
    m = m.resolved()
    for key in ("d_model", "n_layers", "n_heads", "max_len"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    _check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = tokenizer's size)")
    _check(m.d_ff >= 0, "model.d_ff", "must be >= 0 (0 = the family's width)")
    _check(
        m.d_model % m.n_heads == 0,
        "model.n_heads",
        f"d_model {m.d_model} is not divisible by n_heads {m.n_heads}",
    )
    _check(m.n_kv_heads >= 0, "model.n_kv_heads", "must be >= 0 (0 = n_heads)")
    _check(
        m.n_heads % m.kv_heads == 0,
        "model.n_kv_heads",
        f"n_heads {m.n_heads} is not a multiple of n_kv_heads {m.kv_heads}",
    )
    for key, choices in MODEL_CHOICES.items():
        _check(getattr(m, key) in choices, f"model.{key}", f"must be {' or '.join(choices)}")
    if m.position == "rope":
        _check(
            m.head_dim % 2 == 0, "model.n_heads", f"RoPE needs an even head_dim, not {m.head_dim}"
        )
        _check(m.rope_base > 1.0, "model.rope_base", "must be > 1")
    _check(m.sliding_window >= 0, "model.sliding_window", "must be >= 0 (0 = off)")
    if m.attention in ("flash", "splash"):  # kernel limits; seq_len is checked when traced
        _check(
            m.attention != "flash" or m.sliding_window == 0,
            "model.sliding_window",
            "model.attention=flash has no sliding window; use splash, einsum or dot_product",
        )
        _check(
            m.head_dim <= 128 or m.head_dim % 128 == 0,
            "model.n_heads",
            f"model.attention={m.attention} needs head_dim <= 128 or a multiple of 128, "
            f"not {m.head_dim}",
        )
    _check(m.layer_norm_eps > 0, "model.layer_norm_eps", "must be positive")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
    _check(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
    _check(m.remat in ("none", "full", "dots"), "model.remat", "must be none, full or dots")
    _check(
        (m.position == "relative") == (m.family == "t5"),
        "model.position",
        "relative (bucketed bias) is the t5 family's, and t5 has no other",
    )
    if m.family == "t5":
        _check(m.n_decoder_layers >= 0, "model.n_decoder_layers", "must be >= 0 (0 = n_layers)")
        _check(m.relative_buckets >= 4, "model.relative_buckets", "must be at least 4")
        _check(
            m.relative_max_distance > m.relative_buckets // 2,
            "model.relative_max_distance",
            f"must exceed relative_buckets // 2 = {m.relative_buckets // 2} (the exact range)",
        )
        _check(
            m.attention in ("einsum", "dot_product"),
            "model.attention",
            "t5 needs einsum or dot_product (its relative bias is an additive bias)",
        )
    if m.family == "bert":
        _check(m.type_vocab_size > 0, "model.type_vocab_size", "must be positive")
        _check(
            m.attention in ("einsum", "dot_product"),
            "model.attention",
            "bert needs einsum or dot_product (the kernels are causal only)",
        )
        for key, want in (("norm", "layernorm"), ("mlp", "gelu"), ("position", "learned")):
            _check(getattr(m, key) == want, f"model.{key}", f"bert supports only {want}")
        _check(m.tie_embeddings, "model.tie_embeddings", "bert's MLM head is tied")
    return m


def check_trainable(c: Config) -> None:
    """What `jaxlm train` can't do yet, refused before any data or compile work."""
    _check(
        c.model.family != "t5",
        "model.family",
        "model.family t5: training the seq2seq objective is not implemented yet",
    )
    _check(
        c.model.family != "bert",
        "model.family",
        "model.family bert: training the MLM/NSP objective is not implemented yet",
    )


def validate(c: Config) -> Config:
    """Range and consistency checks that the dataclass types can't express."""
    c = dataclasses.replace(c, model=validate_model(c.model))
    m, t, o = c.model, c.train, c.optim
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
    _check(t.nonfinite in ("skip", "stop"), "train.nonfinite", "must be skip or stop")
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
    _check(c.data.streams >= 0, "data.streams", "must be >= 0 (0 = one per process)")
    d = c.distributed
    _check(d.mode in ("auto", "on", "off"), "distributed.mode", "must be auto, on or off")
    _check(d.num_processes >= 0, "distributed.num_processes", "must be >= 0")
    _check(d.process_id >= -1, "distributed.process_id", "must be >= 0 (or -1: from the env)")
    _check(
        d.num_processes == 0 or d.process_id < d.num_processes,
        "distributed.process_id",
        f"{d.process_id} is not below distributed.num_processes {d.num_processes}",
    )
    _check(
        c.mesh.strategy in MESH_STRATEGIES,
        "mesh.strategy",
        f"unknown strategy {c.mesh.strategy!r}; known: {', '.join(MESH_STRATEGIES)}",
    )
    for name, axes in c.mesh.rules.items():
        for axis in axes:
            _check(axis in MESH_AXES, f"mesh.rules.{name}", f"unknown mesh axis {axis!r}")
    return c
