"""Typed, frozen run configuration: YAML presets plus `key=value` overrides.

OmegaConf does the merging and type checking against the dataclasses below, so an
unknown key or a value of the wrong type is caught before anything expensive runs;
`validate` adds the range checks that types cannot express.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from etils import epath
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.model_config import (  # noqa: F401  (re-exported: one place to import configs from)
    DTYPES,
    FAMILIES,
    MODEL_CHOICES,
    SWIGLU_MULTIPLE,
    LoraConfig,
    ModelConfig,
    family_of,
    validate_lora,
    validate_model,
)
from jaxlm.model_config import check as _check


@dataclass(frozen=True)
class TokenizerConfig:
    """A sentencepiece model: `path` if given, else trained from the corpus."""

    path: str = ""
    vocab_size: int = 1024
    model_type: str = "bpe"  # bpe | unigram | char | word
    # Training reads a seeded random sample of the training documents, not the corpus:
    # at most this many documents, and stops once it holds sample_bytes characters.
    sample_docs: int = 100_000
    sample_bytes: int = 200_000_000  # characters


@dataclass(frozen=True)
class MixtureSource:
    """One source of `data.mixture`: a corpus (text, JSONL or a `jaxlm data prepare`
    directory) and its share of the packed rows."""

    path: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/tinyshakespeare.txt"  # a file, a directory or a glob
    text_field: str = "text"  # for JSONL
    # Seq2seq (t5): JSONL fields of each pair, and the target length (0 = train.seq_len,
    # which is the source length).
    source_field: str = "src"
    target_field: str = "tgt"
    target_len: int = 0
    # T5 on plain text pretrains with span corruption (jaxlm/data/span_corruption.py):
    # the share of tokens hidden, and the mean length of the spans they are hidden in.
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    split: str = "paragraph"  # how .txt files become documents: paragraph | line | file
    eval_fraction: float = 0.1  # held out: one document in every 1/eval_fraction
    # A separate held-out set (a file, directory or glob in data.path's format; Hugging
    # Face's validation_file). Set, all of data.path trains and eval_fraction is unused.
    eval_path: str = ""
    # Extractive QA (bert, model.head=qa): context tokens between the starts of a
    # passage's windows when it is longer than a row (BERT's doc_stride; 0 = seq_len / 2).
    doc_stride: int = 0
    shuffle: bool = True
    # Documents are dealt into this many independently packed streams, shared out among
    # the processes (0 = one per process). Fixed, it makes the global batch, and the
    # checkpointed data position, the same for any number of hosts.
    streams: int = 0
    # Supervised fine-tuning (decoders; jaxlm/data/sft.py). JSONL records hold either a
    # prompt and a completion string, or a list of messages {"role": system | user |
    # assistant, "content": ...}, under these field names (TRL's and the hub's).
    # format: auto (sft when the first JSONL record has `messages_field`, or both
    # `prompt_field` and `completion_field`; else text) | text | sft.
    format: str = "auto"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    # The tokens the loss counts (the others stay as context): assistant (every
    # assistant turn, or the completion, with the end-of-turn token) | last (the last
    # assistant turn) | all (every token, prompt included).
    train_on: str = "assistant"
    # Jinja template rendering messages, as transformers' apply_chat_template: "" = the
    # tokenizer's (chat_template.jinja or tokenizer_config.json beside its
    # tokenizer.json), else jaxlm's default (jaxlm/data/chat.py); or a .jinja file, or
    # the template's text.
    chat_template: str = ""
    # An example longer than train.seq_len + 1 tokens is cut on this side: right (drop
    # its end: transformers' default truncation_side) | left (drop its start).
    truncation_side: str = "right"
    # Several sources in proportion to their weights, each packed on its own
    # (jaxlm/data/mixture.py): [{path: web/, weight: 0.7}, {path: books/, weight: 0.3}].
    # Set, it replaces data.path.
    mixture: list[MixtureSource] = field(default_factory=list)


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
    profile_steps: list[int] = field(default_factory=list)  # [START, END]: jax.profiler trace
    tensorboard: bool = True  # RUN_DIR/tensorboard/ event files beside metrics.jsonl
    # Evaluate the held-out split before the first step (a step-0 record): the starting
    # model's eval loss, for fine-tuning (transformers' eval_on_start).
    eval_on_start: bool = False
    # Split each step's batch into this many microbatches, run one after another inside
    # the step with their gradients summed: the same update, with the activations of
    # batch_size / grad_accum rows live at a time (batch_size must divide evenly).
    grad_accum: int = 1


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
_LOGICAL_NAMES += ("lora_rank",)  # LoRA adapters' inner dimension: small, never sharded


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
    # Fine-tuning: start from these weights instead of init (when not resuming): a run
    # or model directory, or `hf:PATH` for a Hugging Face directory (jaxlm/train/init_from.py).
    init_from: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    # Low-rank adapters: rank > 0 trains them alone, the model's weights frozen.
    lora: LoraConfig = field(default_factory=LoraConfig)
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
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a YAML preset, apply `key=value` overrides, type- and range-check."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    merged = schema
    if path is not None:
        path = epath.Path(path)  # a run directory's config may be on gs://
        if not path.is_file():
            raise JaxlmError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.create(path.read_text())
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


def check_trainable(c: Config) -> None:
    """What `jaxlm train` can't do, refused before any data or compile work."""
    family = family_of(c.model)  # its head's objective
    _check(
        family.kind == "decoder" or c.train.sample_prompt == "",
        "train.sample_prompt",
        f"{c.model.family} samples no text at the end of training (decoders only)",
    )
    _check(
        family.objective != "mlm_nsp" or c.model.nsp_head,
        "model.nsp_head",
        f"{c.model.family} trains the MLM + NSP objective, which needs the NSP head",
    )


def _check_sft(c: Config) -> None:
    """The supervised fine-tuning keys (DataConfig)."""
    d = c.data
    _check(d.format in ("auto", "text", "sft"), "data.format", "must be auto, text or sft")
    _check(
        d.train_on in ("assistant", "last", "all"),
        "data.train_on",
        "must be assistant, last or all",
    )
    _check(d.truncation_side in ("right", "left"), "data.truncation_side", "must be right or left")
    for key in ("prompt_field", "completion_field", "messages_field"):
        _check(bool(getattr(d, key)), f"data.{key}", "must name a JSONL field")
    family = FAMILIES[c.model.family]
    _check(
        d.format != "sft" or family.data == "packed",
        "data.format",
        f"sft trains decoders ({', '.join(n for n, f in FAMILIES.items() if f.data == 'packed')})"
        f", not {c.model.family}",
    )


def validate(c: Config) -> Config:
    """Range and consistency checks that the dataclass types can't express."""
    c = dataclasses.replace(c, model=validate_model(c.model))
    m, t, o = c.model, c.train, c.optim
    tok = c.tokenizer
    _check(tok.vocab_size >= 16, "tokenizer.vocab_size", "must be at least 16")
    _check(tok.sample_docs >= 1, "tokenizer.sample_docs", "must be at least 1")
    _check(tok.sample_bytes >= 1, "tokenizer.sample_bytes", "must be at least 1")
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
    _check(c.data.doc_stride >= 0, "data.doc_stride", "must be >= 0 (0 = train.seq_len / 2)")
    _check_sft(c)
    validate_lora(m, c.lora)
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
    _check(t.grad_accum > 0, "train.grad_accum", "must be positive")
    _check(
        t.batch_size % t.grad_accum == 0,
        "train.grad_accum",
        f"train.batch_size {t.batch_size} does not split into {t.grad_accum} equal microbatches",
    )
    _check(t.nonfinite in ("skip", "stop"), "train.nonfinite", "must be skip or stop")
    _check(t.peak_tflops >= 0, "train.peak_tflops", "must be >= 0")
    _check(
        not t.profile_steps
        or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
        "train.profile_steps",
        "must be [] or [START, END] with 1 <= START <= END",
    )
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
    for i, source in enumerate(c.data.mixture):
        _check(bool(source.path), f"data.mixture[{i}].path", "must name a file, directory or glob")
        _check(source.weight >= 0, f"data.mixture[{i}].weight", f"{source.weight} is negative")
    _check(
        not c.data.mixture or sum(s.weight for s in c.data.mixture) > 0,
        "data.mixture",
        "the weights are all zero",
    )
    _check(c.data.streams >= 0, "data.streams", "must be >= 0 (0 = one per process)")
    _check(c.data.target_len >= 0, "data.target_len", "must be >= 0 (0 = train.seq_len)")
    _check(0 < c.data.noise_density < 1, "data.noise_density", "must be between 0 and 1")
    _check(c.data.mean_noise_span_length >= 1, "data.mean_noise_span_length", "must be >= 1")
    _check(
        bool(c.data.source_field) and bool(c.data.target_field),
        "data.source_field",
        "the source and target fields must be named",
    )
    shortest = FAMILIES[m.family].min_seq_len
    _check(
        t.seq_len >= shortest,
        "train.seq_len",
        f"{m.family} needs at least {shortest} tokens (a row its data task can fill)",
    )
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
