"""LoRA adapters in the PEFT format, checked against `peft` and transformers on tiny
transformers-made Llama (grouped kv heads) and GPT-2 (fused c_attn, Conv1D) models:

- export: a LoRA run with random non-zero adapters, written by `jaxlm convert to-peft`
  and loaded by `peft.PeftModel.from_pretrained`, gives jaxlm's logits (1e-4), with
  exactly the adapter keys PEFT's model has; `jaxlm convert to-hf` of the same run
  (adapters merged) loaded by transformers gives them too; the adapter imports back;
- import: an adapter made by peft itself (random B, another alpha, `alpha_pattern`,
  `use_rslora`, GPT-2's fused `c_attn`) loaded with `lora.init_from` gives the
  PeftModel's logits;
- bad adapters are one line each.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from jaxlm.cli import main
from jaxlm.config import to_yaml
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.hf import architecture_for, imported_config
from jaxlm.hf.hf_config import read_hf_config
from jaxlm.hf.peft import check_peft_adapter
from jaxlm.model_config import LoraConfig
from jaxlm.model_dir import save_pretrained
from jaxlm.models import build_model
from jaxlm.train.init_from import check_init_from, load_init_params

from .conftest import TINY
from .test_hf import _bpe_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK = 4
# jaxlm targets for the export: GPT-2's query and value share c_attn (a rank-2r adapter
# there), its out and fc_out are both `c_proj` (attn. / mlp.).
EXPORT_TARGETS = {
    "llama": ["query", "key", "value", "out", "gate", "up", "down"],
    "gpt2": ["query", "value", "out", "fc_in", "fc_out"],
}
# peft-made adapters for the import, and the jaxlm targets they are.
IMPORT = {
    "llama": (
        dict(target_modules=["q_proj", "v_proj", "down_proj"], alpha_pattern={"v_proj": 32}),
        ["query", "value", "down"],
    ),
    "gpt2": (
        dict(target_modules=["c_attn", "mlp.c_proj"], use_rslora=True),
        ["query", "key", "value", "fc_out"],
    ),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    for name in ("llama", "gpt2"):
        (root / name).mkdir()
        vocab = _bpe_tokenizer(root / name).get_vocab_size()
        if name == "llama":
            config = transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.GPT2Config(
                vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64
            )
            model = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():  # no zero biases or unit norms
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / name)
    return root


def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (2, 12)).astype(np.int32)


def _hf_model(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _imported(hf_dir):
    """The jaxlm config of an HF directory, from its config.json alone."""
    hf = read_hf_config(hf_dir)
    return imported_config(architecture_for(hf).config_from_hf(hf), hf_dir.name)


def _lora_model(hf_dir, lora: LoraConfig):
    """(config, logits function, params) of a jaxlm LoRA model on the HF base at
    `hf_dir`, its adapters zeros or, with `lora.init_from`, the PEFT adapter's."""
    config = _imported(hf_dir).replace(init_from=f"hf:{hf_dir}", lora=lora)
    model = build_model(config.model, lora=config.lora)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(shapes["params"])
    )
    logits = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))
    return config, logits, load_init_params(config, zeros)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exported_adapter_and_merged_model_give_jaxlm_logits(hf_dirs, tmp_path, family):
    hf_dir = hf_dirs / family
    lora = LoraConfig(rank=RANK, alpha=8.0, targets=EXPORT_TARGETS[family])
    config, logits, params = _lora_model(hf_dir, lora)
    rng = np.random.default_rng(1)

    def randomised(path, x):  # fresh B is zero: every adapter gets values
        if "lora_" in jax.tree_util.keystr(path):
            return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
        return x

    params = jax.tree_util.tree_map_with_path(randomised, params)
    run = save_pretrained(tmp_path / "run", config, params)
    shutil.copyfile(hf_dir / "tokenizer.json", run / "tokenizer.json")
    tokens = _tokens(config.model.vocab_size)
    ours = np.asarray(logits(params, tokens))

    assert main(["convert", "to-peft", str(run), str(tmp_path / "adapter")]) == 0
    assert main(["convert", "to-hf", str(run), str(tmp_path / "merged")]) == 0
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["task_type"] == "CAUSAL_LM" and written["r"] == RANK
    assert written["base_model_name_or_path"] == str(hf_dir.absolute())

    base = _hf_model(hf_dir)
    base_logits = _torch_logits(base, tokens)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    # PEFT's model has exactly the file's adapter tensors, shape for shape.
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    theirs = peft.get_peft_model_state_dict(adapted)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: v.shape for k, v in saved.items()}
    np.testing.assert_allclose(_torch_logits(adapted, tokens), ours, atol=1e-4)
    np.testing.assert_allclose(
        _torch_logits(_hf_model(tmp_path / "merged"), tokens), ours, atol=1e-4
    )
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters do something

    # ... and imports back: GPT-2's rank-2r c_attn splits into query's and value's
    back = dataclasses.replace(lora, init_from=str(tmp_path / "adapter"))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    reloaded = load_init_params(config.replace(lora=back), zeros)
    np.testing.assert_allclose(np.asarray(logits(reloaded, tokens)), ours, atol=1e-5)
    if family == "gpt2":  # value's rows of c_attn's B are not zero: it must be a target
        unlisted = dataclasses.replace(lora, targets=["query", "out", "fc_in", "fc_out"])
        with pytest.raises(JaxlmError, match="adapts jaxlm's 'value', which lora.targets"):
            check_peft_adapter(tmp_path / "adapter", config.model, unlisted)


def _peft_adapter(hf_dir, out, **settings):
    """A peft-made adapter with random (non-zero) A and B; the PeftModel."""
    settings = dict(r=RANK, lora_alpha=16, init_lora_weights=False, **settings)
    model = peft.get_peft_model(_hf_model(hf_dir), peft.LoraConfig(**settings)).eval()
    with torch.no_grad():  # torch's Linear init for B (r inputs) is large: tame it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_imported_peft_adapter_gives_peft_logits(hf_dirs, tmp_path, family):
    hf_dir = hf_dirs / family
    settings, targets = IMPORT[family]
    adapted = _peft_adapter(hf_dir, tmp_path / "adapter", **settings)
    # jaxlm's alpha differs from the adapter's: the scale is folded into B
    lora = LoraConfig(rank=RANK, alpha=8.0, targets=targets, init_from=str(tmp_path / "adapter"))
    config, logits, params = _lora_model(hf_dir, lora)
    tokens = _tokens(config.model.vocab_size)
    ours = np.asarray(logits(params, tokens))
    np.testing.assert_allclose(ours, _torch_logits(adapted, tokens), atol=1e-4)
    base_logits = _torch_logits(_hf_model(hf_dir), tokens)
    assert np.abs(ours - base_logits).max() > 1e-2


@pytest.fixture(scope="module")
def adapters(hf_dirs, tmp_path_factory):
    """A good peft-made Llama adapter (q_proj, v_proj) and broken copies of it."""
    root = tmp_path_factory.mktemp("adapters")
    _peft_adapter(hf_dirs / "llama", root / "good", target_modules=["q_proj", "v_proj"])
    (root / "empty").mkdir()
    shutil.copytree(root / "good", root / "lm_head")
    weights = root / "lm_head" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((RANK, 32), np.float32)
    save_file(tensors, weights)
    return root


@pytest.mark.parametrize(
    "directory, rank, targets, message",
    [
        ("empty", RANK, ["query", "value"], "lora.init_from {dir}: no adapter_config.json"),
        (
            "good",
            2,
            ["query", "value"],
            "{weights}: model.layers.0.self_attn.q_proj has rank 4, lora.rank is 2",
        ),
        (
            "good",
            RANK,
            ["query"],
            "{weights}: tensor base_model.model.model.layers.0.self_attn."
            "v_proj.lora_A.weight adapts jaxlm's 'value', which lora.targets does not list (query)",
        ),
        (
            "good",
            RANK,
            ["query", "value", "up"],
            "{weights}: no lora_A for model.layers.0.mlp.up_proj (lora.targets lists 'up')",
        ),
        (
            "lm_head",
            RANK,
            ["query", "value"],
            "{weights}: tensor base_model.model.lm_head.lora_A"
            ".weight adapts lm_head, which jaxlm has no LoRA target for (llama: mlp.down_proj, "
            "mlp.gate_proj, mlp.up_proj, self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, "
            "self_attn.v_proj)",
        ),
    ],
)
def test_bad_adapters_are_one_line(hf_dirs, adapters, directory, rank, targets, message):
    path = adapters / directory
    model = _imported(hf_dirs / "llama").model
    lora = LoraConfig(rank=rank, targets=targets)
    with pytest.raises(JaxlmError) as err:
        check_peft_adapter(path, model, lora)
    weights = path / "adapter_model.safetensors"
    want = message.format(dir=path, weights=weights)
    assert str(err.value).startswith(want) and "\n" not in str(err.value)


def test_bad_adapter_stops_jaxlm_train_first(hf_dirs, adapters, tmp_path, capsys):
    """Exit 2, one line, before the run directory exists."""
    argv = [*TINY, "model.family=llama", f"init_from=hf:{hf_dirs / 'llama'}"]
    argv += ["lora.rank=2", f"lora.init_from={adapters / 'good'}"]
    assert main(["train", *argv, "--run-dir", str(tmp_path / "out")]) == 2
    weights = adapters / "good" / "adapter_model.safetensors"
    want = f"{weights}: model.layers.0.self_attn.q_proj has rank 4, lora.rank is 2"
    assert capsys.readouterr().err == f"jaxlm: error: {want}\n"
    assert not (tmp_path / "out").exists()


def test_bad_export_and_init_from_are_one_line(hf_dirs, adapters, tmp_path, capsys):
    """A run without adapters has nothing for to-peft; lora.init_from needs the base."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text(to_yaml(_imported(hf_dirs / "llama")))
    assert main(["convert", "to-peft", str(plain), str(tmp_path / "out")]) == 2
    want = f"{plain}: lora.rank is 0, no adapters to export (jaxlm convert to-hf writes the model)"
    assert capsys.readouterr().err == f"jaxlm: error: {want}\n"
    lora = LoraConfig(rank=RANK, init_from=str(adapters / "good"))
    with pytest.raises(ConfigError) as err:
        check_init_from(_imported(hf_dirs / "llama").replace(lora=lora))
    want = "config key 'lora.init_from': needs init_from, the base the adapter was made for"
    assert str(err.value) == want
