"""The model's architecture config, separate from the run config so that research
code building a model needs nothing of OmegaConf, data or training settings.

`FAMILIES` declares each model family once: the architecture fields it fills in when
a config leaves them empty, its Flax module, objective, data task, Hugging Face
mapping and FLOPs. Everything else looks families up there, so adding one is one
entry (plus its module, objective or data code when new). `validate_model` checks the
filled-in copy and names the offending key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jaxlm.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


MODEL_CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "relu", "geglu"),
    "position": ("learned", "rope", "relative"),
    "attention": ("einsum", "dot_product", "flash", "splash", "auto"),
}
SWIGLU_MULTIPLE = 256  # Llama rounds its SwiGLU width up to this

# The activations a remat policy may keep, by the `checkpoint_name`s the layers give
# them: the projections' outputs and attention's output ("context"; for the splash
# kernel also its log-sum-exp, so the backward does not rerun the kernel's forward).
REMAT_NAMES = (
    "query_proj", "key_proj", "value_proj", "out_proj", "mlpwi", "mlpwo", "context",
)  # fmt: skip
PROJECTIONS = REMAT_NAMES[:6]
# Named lists of kept activations: MaxText's recipes of the same names, and one that
# keeps attention's inputs and output but recomputes the (larger) MLP activations.
REMAT_RECIPES = {
    "minimal": PROJECTIONS,
    "minimal_with_context": (*PROJECTIONS, "context"),
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
    "qkv_with_context": ("query_proj", "key_proj", "value_proj", "context"),
}
REMATS = ("none", "full", "dots", *REMAT_RECIPES)


def remat_saved_names(remat: str) -> tuple[str, ...]:
    """The activations `model.remat` keeps: a recipe's, or `save:NAME+NAME+...`'s."""
    if remat in REMAT_RECIPES:
        return REMAT_RECIPES[remat]
    return tuple(remat.removeprefix("save:").split("+"))


def remat_offloaded_names(offload: str) -> tuple[str, ...]:
    """The activations `model.remat_offload` moves to host memory (NAME+NAME or "")."""
    return tuple(offload.split("+")) if offload else ()


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on a decoder's projections.

    Each targeted projection W (d_in -> d_out) gains A (d_in x rank, random) and B
    (rank x d_out, zeros) and computes x W + (alpha / rank) dropout(x) A B; training
    updates only A and B (jaxlm/train/optim.py). `targets` are the projections' module
    names (`lora_targets` lists a model's). rank 0 = off: the model is exactly the
    plain one.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only, as PEFT's lora_dropout
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    init_from: str = ""  # a PEFT adapter directory the adapters start from (jaxlm/hf/peft.py)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def frozen(self) -> LoraConfig:
        """A hashable copy (targets as a tuple), for a Flax module attribute."""
        return dataclasses.replace(self, targets=tuple(self.targets), init_from="")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. `vocab_size` left at 0 takes the tokenizer's size.

    `family` (a key of FAMILIES) fills the fields left empty with its defaults;
    `resolved()` gives the filled-in copy that models use.
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
    mlp: str = ""  # gelu | swiglu | relu (T5) | geglu (T5 v1.1's gated tanh-GELU)
    # learned (a table of max_len) | rope (from the packed positions) | relative (T5's bias)
    position: str = ""
    rope_base: float = 10000.0
    # RoPE context extension (Hugging Face `rope_scaling`): "" (none) | linear | llama3;
    # llama3 also reads the low/high frequency factors and the original context length.
    rope_scaling: str = ""
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    use_bias: bool | None = None  # in projections and LayerNorm
    tie_embeddings: bool | None = None
    sliding_window: int = 0  # attend to at most this many latest tokens; 0 = all
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    scan_layers: bool = True
    # none | full (keep each layer's input) | dots (every matmul output) | a recipe of
    # REMAT_RECIPES | save:NAME+NAME (keep these of REMAT_NAMES, recompute the rest)
    remat: str = "none"
    # NAME+NAME of REMAT_NAMES to move to host memory in the forward and back for the
    # backward, instead of recomputing them (with remat full or a list of kept names).
    # XLA's cost model prices these copies like HBM copies, not at the host link's
    # bandwidth, so `jaxlm compile`'s estimate of an offloading setup is optimistic.
    remat_offload: str = ""
    # auto (the platform's best, chosen when the model is built for its devices:
    # jaxlm.models.attention.resolve_attention) | einsum (the reference) | dot_product
    # (jax.nn) | flash | splash (Pallas TPU kernels, interpreted off TPU; seq_len a
    # multiple of 128)
    attention: str = "auto"
    # Encoder-decoder (t5) only: decoder depth (0 = n_layers; n_layers is the encoder's)
    # and T5's bucketed relative position bias.
    n_decoder_layers: int = 0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    d_kv: int = 0  # t5 only: the heads' width (0 = d_model // n_heads; T5 v1.1 differs)
    type_vocab_size: int = 2  # bert only: token-type (segment A/B) embedding rows
    nsp_head: bool = True  # bert only: pooler + next-sentence head (False: MLM only)
    # The task head, for families that have more than one (FAMILIES[...].heads): bert's
    # mlm_nsp (pretraining, the default) | qa (extractive QA's start/end logits).
    head: str = ""

    def resolved(self) -> ModelConfig:
        """This config with the family's defaults in the empty fields (idempotent)."""
        family = FAMILIES.get(self.family)
        defaults = family.defaults if family else {}
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
        return self.d_kv or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_t5(m: ModelConfig) -> None:
    check(m.d_kv >= 0, "model.d_kv", "must be >= 0 (0 = d_model // n_heads)")
    check(m.n_decoder_layers >= 0, "model.n_decoder_layers", "must be >= 0 (0 = n_layers)")
    check(m.relative_buckets >= 4, "model.relative_buckets", "must be at least 4")
    check(
        m.relative_max_distance > m.relative_buckets // 2,
        "model.relative_max_distance",
        f"must exceed relative_buckets // 2 = {m.relative_buckets // 2} (the exact range)",
    )


def _check_bert(m: ModelConfig) -> None:
    check(m.type_vocab_size > 0, "model.type_vocab_size", "must be positive")
    for key, want in (("norm", "layernorm"), ("mlp", "gelu"), ("position", "learned")):
        check(getattr(m, key) == want, f"model.{key}", f"bert supports only {want}")
    check(m.tie_embeddings, "model.tie_embeddings", "bert's MLM head is tied")
    check(m.head in ("mlm_nsp", "qa"), "model.head", "bert's heads are mlm_nsp or qa")


def dense_flops_per_token(config: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward) plus 12 L (n_heads
    head_dim) T for attention scores and values (PaLM, App. B). N leaves out the tables that
    are only looked up: a learned position table, and the input embedding when untied (tied,
    it is also the output matmul). T is the attended span: seq_len, or a shorter sliding
    window. Grouped kv heads and SwiGLU need no term of their own: they change N."""
    c = config.resolved()
    lookups = c.max_len * c.d_model if c.position == "learned" else 0
    if not c.tie_embeddings:
        lookups += c.vocab_size * c.d_model
    span = min(seq_len, c.sliding_window or seq_len)
    attention = 12.0 * c.n_layers * c.n_heads * c.head_dim * span
    return 6.0 * (n_params - lookups) + attention


@dataclass(frozen=True)
class Family:
    """Everything the stack needs to know about a model family, so that no code outside
    this table tests which family it has. The defaults are a decoder's."""

    defaults: Mapping[str, Any]  # the architecture fields filled in when left empty
    module: str  # the Flax module class in jaxlm.models (`build_model` looks it up)
    kind: str = "decoder"  # decoder | encoder | encoder_decoder
    objective: str = "causal_lm"  # a key of jaxlm.train.objectives.OBJECTIVES
    data: str = "packed"  # a key of jaxlm.data.tasks: packed | mlm_nsp | seq2seq
    generates: bool = True  # jaxlm.generation produces text with it
    hf: str | None = None  # the jaxlm.hf mapping module, named as HF's model_type
    hf_architectures: tuple[str, ...] = ()  # the HF `architectures` that module converts
    min_seq_len: int = 1  # the shortest train.seq_len its data task can fill
    check: Callable[[ModelConfig], None] | None = None  # its own config checks
    # Training FLOPs per token from (config, parameter count, seq_len), for MFU and info.
    flops_per_token: Callable[[ModelConfig, int, int], float] = dense_flops_per_token
    # Task heads besides the default one (`model.head`), each overriding the fields above
    # that it changes (module, objective, data); `family_of` applies them.
    heads: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def family_of(m: ModelConfig) -> Family:
    """`m`'s family with its task head's overrides applied: what builds, trains and
    feeds a BERT with the QA head differs from its pretraining one."""
    family = FAMILIES[m.family]
    return dataclasses.replace(family, **family.heads.get(m.resolved().head, {}))


_GPT2 = {"norm": "layernorm", "mlp": "gelu", "position": "learned", "use_bias": True}
_RMS = {"norm": "rmsnorm", "use_bias": False}
FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        _GPT2 | {"tie_embeddings": True},
        "Decoder",
        hf="gpt2",
        hf_architectures=("GPT2LMHeadModel", "GPT2Model"),
    ),
    "llama": Family(
        _RMS | {"mlp": "swiglu", "position": "rope", "tie_embeddings": False},
        "Decoder",
        hf="llama",
        hf_architectures=("LlamaForCausalLM",),
    ),
    "t5": Family(
        _RMS | {"mlp": "relu", "position": "relative", "tie_embeddings": True},
        "T5",
        kind="encoder_decoder",
        objective="seq2seq",
        data="seq2seq",
        hf="t5",
        hf_architectures=("T5ForConditionalGeneration",),
        check=_check_t5,
    ),
    # Post-LN with exact GELU (models/encoder.py), MLM + NSP heads.
    "bert": Family(
        _GPT2 | {"tie_embeddings": True, "head": "mlm_nsp"},
        "BertForPreTraining",
        kind="encoder",
        objective="mlm_nsp",
        data="mlm_nsp",
        generates=False,
        hf="bert",
        hf_architectures=("BertForPreTraining", "BertForMaskedLM", "BertForQuestionAnswering"),
        min_seq_len=7,  # [CLS] A [SEP] B [SEP] with two tokens per segment
        check=_check_bert,
        heads={
            "qa": {
                "module": "BertForQuestionAnswering",
                "objective": "extractive_qa",
                "data": "extractive_qa",
            }
        },
    ),
}


# The projections a decoder block has, by module name (attention's, then the MLP's by
# ModelConfig.mlp), and which of each's kernel dimensions are its input: the adapters'
# shapes follow from them.
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
MLP_PROJECTIONS = {"gelu": ("fc_in", "fc_out"), "relu": ("fc_in", "fc_out")}
MLP_PROJECTIONS["swiglu"] = MLP_PROJECTIONS["geglu"] = ("gate", "up", "down")


def lora_targets(m: ModelConfig) -> tuple[str, ...]:
    """The projection names `lora.targets` may list for model `m`."""
    return ATTENTION_PROJECTIONS + MLP_PROJECTIONS[m.resolved().mlp]


def projection_dims(m: ModelConfig, name: str) -> tuple[int, int]:
    """(d_in, d_out) of projection `name` of one decoder block, heads flattened."""
    m = m.resolved()
    q, kv, f, d = m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.ff_dim, m.d_model
    dims = {"query": (d, q), "key": (d, kv), "value": (d, kv), "out": (q, d)}
    dims |= {"fc_in": (d, f), "gate": (d, f), "up": (d, f), "fc_out": (f, d), "down": (f, d)}
    return dims[name]


def lora_param_count(m: ModelConfig, lora: LoraConfig) -> int:
    """The trainable parameters of `lora` on `m`: rank (d_in + d_out) per targeted
    projection per layer."""
    if lora.rank == 0:
        return 0
    per_layer = sum(lora.rank * sum(projection_dims(m, t)) for t in set(lora.targets))
    return m.n_layers * per_layer


def validate_lora(m: ModelConfig, lora: LoraConfig) -> None:
    """`lora`'s checks against the model it adapts."""
    check(lora.rank >= 0, "lora.rank", "must be >= 0 (0 = off)")
    if lora.rank == 0:
        return
    family = FAMILIES[m.family]
    decoders = ", ".join(n for n, f in FAMILIES.items() if f.kind == "decoder")
    check(family.kind == "decoder", "lora.rank", f"adapters are for decoders ({decoders})")
    check(lora.alpha > 0, "lora.alpha", "must be positive")
    check(0.0 <= lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    valid = lora_targets(m)
    check(bool(lora.targets), "lora.targets", f"must name projections: {', '.join(valid)}")
    for name in lora.targets:
        check(
            name in valid,
            "lora.targets",
            f"unknown projection {name!r} for {m.family}; valid: {', '.join(valid)}",
        )
    for name in lora.targets:
        smaller = min(projection_dims(m, name))
        check(
            lora.rank <= smaller,
            "lora.rank",
            f"{lora.rank} exceeds {smaller}, the smaller dimension of projection {name!r}",
        )


def flops_per_token(config: ModelConfig, n_params: int, seq_len: int) -> float:
    """The family's training FLOPs per token (the MFU a run logs, `jaxlm info`)."""
    return FAMILIES[config.family].flops_per_token(config, n_params, seq_len)


def validate_model(m: ModelConfig) -> ModelConfig:
    """The model's checks, on the copy with the family's defaults filled in."""
    families = ", ".join(FAMILIES)
    check(m.family in FAMILIES, "model.family", f"unknown family {m.family!r}; known: {families}")
    family, m = FAMILIES[m.family], m.resolved()
    for key in ("d_model", "n_layers", "n_heads", "max_len"):
        check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = tokenizer's size)")
    check(m.d_ff >= 0, "model.d_ff", "must be >= 0 (0 = the family's width)")
    check(
        m.d_kv > 0 or m.d_model % m.n_heads == 0,
        "model.n_heads",
        f"d_model {m.d_model} is not divisible by n_heads {m.n_heads}",
    )
    check(m.n_kv_heads >= 0, "model.n_kv_heads", "must be >= 0 (0 = n_heads)")
    check(
        m.n_heads % m.kv_heads == 0,
        "model.n_kv_heads",
        f"n_heads {m.n_heads} is not a multiple of n_kv_heads {m.kv_heads}",
    )
    for key, choices in MODEL_CHOICES.items():
        check(getattr(m, key) in choices, f"model.{key}", f"must be {' or '.join(choices)}")
    if m.position == "rope":
        check(
            m.head_dim % 2 == 0, "model.n_heads", f"RoPE needs an even head_dim, not {m.head_dim}"
        )
        check(m.rope_base > 1.0, "model.rope_base", "must be > 1")
        check(
            m.rope_scaling in ("", "linear", "llama3"),
            "model.rope_scaling",
            "must be empty (none), linear or llama3",
        )
        check(m.rope_scaling_factor > 0, "model.rope_scaling_factor", "must be positive")
        check(
            m.rope_scaling != "llama3" or m.rope_high_freq_factor > m.rope_low_freq_factor > 0,
            "model.rope_high_freq_factor",
            "llama3 scaling needs rope_high_freq_factor > rope_low_freq_factor > 0",
        )
        check(m.rope_original_max_len > 0, "model.rope_original_max_len", "must be positive")
    check(
        m.position == "rope" or not m.rope_scaling,
        "model.rope_scaling",
        "scales RoPE, so it needs model.position=rope",
    )
    check(m.sliding_window >= 0, "model.sliding_window", "must be >= 0 (0 = off)")
    check(
        m.d_kv == 0 or family.kind == "encoder_decoder",
        "model.d_kv",
        "sets the heads' width of an encoder-decoder (t5) only; leave it 0",
    )
    if m.attention in ("flash", "splash"):  # kernel limits; seq_len is checked when traced
        check(
            m.attention != "flash" or m.sliding_window == 0,
            "model.sliding_window",
            "model.attention=flash has no sliding window; use splash, einsum or dot_product",
        )
        check(
            m.head_dim <= 128 or m.head_dim % 128 == 0,
            "model.n_heads",
            f"model.attention={m.attention} needs head_dim <= 128 or a multiple of 128, "
            f"not {m.head_dim}",
        )
    check(m.layer_norm_eps > 0, "model.layer_norm_eps", "must be positive")
    check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
    check(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
    if m.remat.startswith("save:"):
        unknown = [n for n in remat_saved_names(m.remat) if n not in REMAT_NAMES]
        check(
            not unknown,
            "model.remat",
            f"save: keeps names of {', '.join(REMAT_NAMES)} joined by '+', not {unknown}",
        )
    else:
        check(
            m.remat in REMATS,
            "model.remat",
            f"must be one of {', '.join(REMATS)}, or save:NAME+NAME",
        )
    if m.remat_offload:
        offloaded = remat_offloaded_names(m.remat_offload)
        unknown = [n for n in offloaded if n not in REMAT_NAMES]
        check(
            not unknown,
            "model.remat_offload",
            f"names of {', '.join(REMAT_NAMES)} joined by '+', not {unknown}",
        )
        check(
            m.remat not in ("none", "dots"),
            "model.remat_offload",
            f"needs model.remat full or a list of kept names, not {m.remat}",
        )
        if m.remat not in ("none", "dots", "full"):
            both = [n for n in offloaded if n in remat_saved_names(m.remat)]
            check(not both, "model.remat_offload", f"{both} already kept by model.remat")
    relative = [name for name, f in FAMILIES.items() if f.defaults["position"] == "relative"]
    check(
        (m.position == "relative") == (m.family in relative),
        "model.position",
        f"relative (bucketed bias) is {', '.join(relative)}'s, which has no other",
    )
    check(
        family.kind == "decoder" or m.attention not in ("flash", "splash"),
        "model.attention",
        f"{m.family} needs einsum, dot_product or auto (the kernels are causal, without an "
        "additive bias)",
    )
    check(
        "head" in family.defaults or not m.head,
        "model.head",
        f"{m.family} has one head; leave it empty",
    )
    if family.check:
        family.check(m)
    return m
