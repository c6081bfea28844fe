"""Hugging Face interop against transformers itself: tiny random GPT-2, Llama (GQA,
RoPE scaling, tied and untied) and BERT (ForMaskedLM, ForPreTraining) checkpoints are
imported and must give transformers' logits; exported ones must load in transformers
with the same logits; import -> export -> import is bitwise exact; tokenizers encode
as transformers' do; fine-tuning starts from the imported weights.

Nothing is downloaded: models have random weights and tokenizers are trained here on
the repository's corpus.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.cli import main as jaxlm_main
from jaxlm.config import MeshConfig, load_config
from jaxlm.errors import JaxlmError
from jaxlm.hf import convert_to_hf, load_hf_pretrained
from jaxlm.pretrained import load_pretrained, save_pretrained
from jaxlm.train.state import abstract_state

from .conftest import CORPUS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTH, REAL = 12, 7  # the second row is right-padded after REAL tokens
ATOL = 1e-4


def _paragraphs(n: int) -> list[str]:
    return [p for p in CORPUS.read_text().split("\n\n") if p.strip()][:n]


def _bpe_tokenizer(directory):
    """GPT-2-style byte-level BPE; its special tokens come from GPT2Tokenizer's defaults."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_paragraphs(400), trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 64}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def _wordpiece_tokenizer(directory):
    """BERT-style WordPiece; [CLS]/[SEP]/[MASK]/[PAD] from BertTokenizer's defaults."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(_paragraphs(400), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def _hf_model(name: str, vocab: int):
    t = transformers
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if name == "gpt2":
        config = t.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return t.GPT2LMHeadModel(config)
    if name.startswith("llama"):
        llama = dict(
            vocab_size=vocab,
            intermediate_size=64,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=500.0,
            **small,
        )
        if name == "llama_scaled":  # tied, and llama3 scaling that changes every frequency
            llama |= dict(tie_word_embeddings=True, num_key_value_heads=1)
            llama["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        return t.LlamaForCausalLM(t.LlamaConfig(**llama))
    bert = t.BertConfig(vocab_size=vocab, intermediate_size=64, max_position_embeddings=64, **small)
    return t.BertForPreTraining(bert) if name == "bert" else t.BertForMaskedLM(bert)


MODELS = ("gpt2", "llama", "llama_scaled", "bert", "bert_mlm")


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (2, LENGTH))
    mask = np.ones((2, LENGTH), np.int64)
    mask[1, REAL:] = 0
    ids[1, REAL:] = 0
    types = np.zeros((2, LENGTH), np.int64)
    types[0, LENGTH // 2 :] = 1
    return ids, mask, types


def _hf_logits(model, name: str, ids, mask, types):
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        if name.startswith("bert"):
            out = model(token_type_ids=torch.tensor(types), **kw)
            if name == "bert":
                return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()
            return (out.logits.numpy(),)
        return (model(**kw).logits.numpy(),)


def _jaxlm_logits(model, params, name: str, ids, mask, types):
    apply = jax.jit(model.apply)
    if name.startswith("bert"):
        out = apply({"params": params}, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
        return tuple(np.asarray(x) for x in out)
    return (np.asarray(apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))),)


def _assert_logits_match(got, want, mask, atol=ATOL):
    assert len(got) == len(want)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[0][real], want[0][real], atol=atol, rtol=0)
    for g, w in zip(got[1:], want[1:], strict=True):  # NSP logits: one per row
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (HF directory, batch, transformers' logits) for every model."""
    root = tmp_path_factory.mktemp("hf")
    bpe_dir, wp_dir = root / "bpe", root / "wordpiece"
    bpe_dir.mkdir()
    wp_dir.mkdir()
    vocabs = {
        "bpe": _bpe_tokenizer(bpe_dir).get_vocab_size(),
        "wordpiece": _wordpiece_tokenizer(wp_dir).get_vocab_size(),
    }
    out = {}
    torch.manual_seed(0)
    for name in MODELS:
        kind = "wordpiece" if name.startswith("bert") else "bpe"
        model = _hf_model(name, vocabs[kind]).eval()
        with torch.no_grad():  # no zero biases or unit norms: every tensor's role shows
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        directory = root / name
        model.save_pretrained(directory)
        for f in (bpe_dir if kind == "bpe" else wp_dir).iterdir():
            shutil.copyfile(f, directory / f.name)
        batch = _batch(vocabs[kind])
        out[name] = (directory, batch, _hf_logits(model, name, *batch))
    return out


@pytest.fixture(scope="module")
def imported(hf_dirs):
    """name -> load_hf_pretrained result (llama on a data x fsdp x tensor mesh)."""
    out = {}
    for name in MODELS:
        mesh = MeshConfig(data=2, fsdp=2, tensor=2) if name == "llama" else None
        out[name] = load_hf_pretrained(hf_dirs[name][0], mesh=mesh)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_import_matches_transformers(hf_dirs, imported, name):
    _, (ids, mask, types), want = hf_dirs[name]
    model, params, tokenizer, config = imported[name]
    _assert_logits_match(_jaxlm_logits(model, params, name, ids, mask, types), want, mask)
    assert tokenizer is not None and config.model.vocab_size == tokenizer.get_piece_size()


def test_import_streams_onto_the_mesh(imported):
    """Params land sharded by the logical rules: GQA key heads over `tensor`, width over
    `fsdp` (what `abstract_state` computes), not gathered on one device."""
    _, params, _, config = imported["llama"]
    key = params["layers"]["attn"]["key"]["kernel"]  # (layers, embed, kv_heads, head_dim)
    assert key.shape == (2, 32, 2, 8)
    assert tuple(key.sharding.spec)[:3] == (None, "fsdp", "tensor")
    assert config.model.kv_heads == 2 and not config.model.tie_embeddings


def test_config_fields_come_from_config_json(imported):
    m = imported["llama_scaled"].config.model
    assert (m.rope_base, m.rope_scaling, m.rope_scaling_factor) == (500.0, "llama3", 4.0)
    assert (m.rope_original_max_len, m.kv_heads, m.tie_embeddings) == (16, 1, True)
    assert "lm_head" not in imported["llama_scaled"].params
    assert imported["bert"].config.model.nsp_head and not imported["bert_mlm"].config.model.nsp_head
    assert "nsp" not in imported["bert_mlm"].params
    assert "pooler" not in imported["bert_mlm"].params["encoder"]


def _trees_equal(a, b) -> bool:
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(flat_a, flat_b, strict=True)
    )


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """name -> jaxlm model directory written by `jaxlm convert from-hf`."""
    root = tmp_path_factory.mktemp("converted")
    for name in MODELS:
        assert jaxlm_main(["convert", "from-hf", str(hf_dirs[name][0]), str(root / name)]) == 0
    return {name: root / name for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_export_loads_in_transformers_and_reimports_exactly(
    hf_dirs, imported, converted, tmp_path, name
):
    hf_dir, (ids, mask, types), want = hf_dirs[name]
    model_dir, out = converted[name], tmp_path / "hf"
    assert jaxlm_main(["convert", "to-hf", str(model_dir), str(out)]) == 0
    auto = {
        "bert": transformers.AutoModelForPreTraining,
        "bert_mlm": transformers.AutoModelForMaskedLM,
    }
    loaded = auto.get(name, transformers.AutoModelForCausalLM).from_pretrained(out).eval()
    _assert_logits_match(_hf_logits(loaded, name, ids, mask, types), want, mask, atol=1e-6)
    assert _trees_equal(load_hf_pretrained(out).params, imported[name].params)
    assert _trees_equal(load_pretrained(model_dir).params, imported[name].params)
    assert (
        json.loads((out / "config.json").read_text())["architectures"]
        == json.loads((hf_dir / "config.json").read_text())["architectures"]
    )


def test_sharded_checkpoint_round_trip(hf_dirs, imported, converted, tmp_path):
    _, (ids, mask, types), want = hf_dirs["llama"]
    out = convert_to_hf(converted["llama"], tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _assert_logits_match(_hf_logits(loaded, "llama", ids, mask, types), want, mask, atol=1e-6)
    assert _trees_equal(load_hf_pretrained(out).params, imported["llama"].params)


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_checkpoints_name_the_tensor_or_architecture(hf_dirs, tmp_path):
    gpt2 = hf_dirs["gpt2"][0]
    with pytest.raises(JaxlmError, match=r"tensor transformer\.wpe\.weight has shape \(64, 32\)"):
        load_hf_pretrained(_edited_copy(gpt2, tmp_path / "short", n_positions=32))
    with pytest.raises(JaxlmError, match="model_type 'mistral' is not supported"):
        load_hf_pretrained(_edited_copy(gpt2, tmp_path / "mistral", model_type="mistral"))
    bert = hf_dirs["bert"][0]
    with pytest.raises(JaxlmError, match="architecture BertForSequenceClassification"):
        load_hf_pretrained(
            _edited_copy(bert, tmp_path / "cls", architectures=["BertForSequenceClassification"])
        )
    tied = hf_dirs["llama_scaled"][0]
    with pytest.raises(JaxlmError, match=r"tensor lm_head.weight is missing .*lm_head/kernel"):
        load_hf_pretrained(_edited_copy(tied, tmp_path / "untied", tie_word_embeddings=False))
    llama = hf_dirs["llama"][0]
    with pytest.raises(JaxlmError, match="hidden_act='gelu' is not supported"):
        load_hf_pretrained(_edited_copy(llama, tmp_path / "act", hidden_act="gelu"))


def test_rope_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxlm.models.rope import RopeScaling, inverse_frequencies

    for scaling in (
        RopeScaling("linear", 4.0),
        RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
    ):
        params = {"rope_type": scaling.kind, "rope_theta": 500.0, "factor": scaling.factor}
        if scaling.kind == "llama3":
            params |= {
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_len,
            }
        config = transformers.LlamaConfig(
            hidden_size=256, num_attention_heads=4, rope_parameters=params
        )
        want, _ = ROPE_INIT_FUNCTIONS[scaling.kind](config, "cpu")
        got = inverse_frequencies(64, 500.0, scaling)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
        assert not np.allclose(np.asarray(got), np.asarray(inverse_frequencies(64, 500.0)))


def test_hf_tokenizers_follow_transformers(hf_dirs):
    from jaxlm.pretrained import load_tokenizer_dir

    text = "\n\n".join(_paragraphs(30)[-5:]) + " Émile 42!"
    for name in ("gpt2", "bert"):
        directory = hf_dirs[name][0]
        ours, theirs = (
            load_tokenizer_dir(directory),
            transformers.AutoTokenizer.from_pretrained(directory),
        )
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.get_piece_size() == len(theirs)
        for key in ("bos", "eos", "unk", "pad"):
            want = getattr(theirs, f"{key}_token_id")
            assert getattr(ours, f"{key}_id")() == (-1 if want is None else want), key
    gpt2 = load_tokenizer_dir(hf_dirs["gpt2"][0])
    assert gpt2.decode(gpt2.encode(text)) == text  # byte-level BPE loses nothing
    assert gpt2.bos_id() == gpt2.eos_id() == gpt2.piece_to_id("<|endoftext|>")
    bert = load_tokenizer_dir(hf_dirs["bert"][0])
    bert_hf = transformers.AutoTokenizer.from_pretrained(hf_dirs["bert"][0])
    for key in ("cls", "sep", "mask"):
        assert getattr(bert, f"{key}_id")() == getattr(bert_hf, f"{key}_token_id")


@pytest.fixture(scope="module")
def native_llama(tmp_path_factory):
    """A jaxlm-trained-style model directory: random Llama params + a sentencepiece
    tokenizer trained here, as `jaxlm train` would leave them."""
    from jaxlm.data.tokenizer import train_tokenizer
    from jaxlm.sharding import logical_rules, make_mesh

    root = tmp_path_factory.mktemp("native")
    train_tokenizer(_paragraphs(2000), root / "tokenizer.model", 384, "bpe")
    config = load_config(
        None,
        [
            "model.family=llama",
            "model.vocab_size=384",
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.d_ff=64",
            "model.max_len=64",
            "model.rope_scaling=linear",
            "model.rope_scaling_factor=2.0",
            "tokenizer.vocab_size=384",
            "train.seq_len=64",
            "model.scan_layers=false",
        ],
    )
    _, abstract, _ = abstract_state(config, make_mesh(config.mesh), logical_rules(config.mesh))
    keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree_util.tree_leaves(abstract)))
    leaves, tree = jax.tree_util.tree_flatten(abstract)
    params = jax.tree_util.tree_unflatten(
        tree, [0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )
    save_pretrained(root, config, params)
    return root


def test_native_model_exports_with_its_sentencepiece_tokenizer(native_llama, tmp_path):
    import sentencepiece as spm

    out = convert_to_hf(native_llama, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(native_llama / "tokenizer.model"))
    texts = [*_paragraphs(600)[-300:], "  two leading spaces", "\nnewline first", "1984 & ü"]
    for text in texts:
        assert theirs(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert theirs("Hi")["input_ids"][0] == sp.bos_id()  # BOS first, as jaxlm's documents
    assert (theirs.eos_token_id, theirs.pad_token_id) == (sp.eos_id(), sp.pad_id())

    model, params, _, _ = load_pretrained(native_llama)
    ids, mask, types = _batch(384)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.rope_parameters["rope_type"] == "linear"
    _assert_logits_match(
        _hf_logits(loaded, "llama", ids, mask, types),
        _jaxlm_logits(model, params, "llama", ids, mask, types),
        mask,
    )


def test_init_from_hf_starts_from_the_imported_weights(hf_dirs, imported, converted, tmp_path):
    """`jaxlm train OUT/config.yaml init_from=hf:HF_DIR`: the first step's loss is the
    imported model's loss on that batch, computed here from the pipeline's batch."""
    from jaxlm.data import tasks
    from jaxlm.data.pipeline import make_dataset, split_documents
    from jaxlm.train.loop import train

    hf_dir, model_dir = hf_dirs["gpt2"][0], converted["gpt2"]
    overrides = [
        f"init_from=hf:{hf_dir}",
        f"data.path={CORPUS}",
        "train.steps=1",
        "train.batch_size=8",
        "train.seq_len=32",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.eval_batches=1",
        "train.sample_tokens=0",
    ]
    config = load_config(model_dir / "config.yaml", overrides)
    result = train(config, tmp_path / "run", progress=False)

    docs = tasks.read_examples(config)
    train_docs, _ = split_documents(docs, config.data.eval_fraction)
    tokenizer = load_pretrained(model_dir).tokenizer
    dataset = make_dataset(
        train_docs, tokenizer, seq_len=32, batch_size=8, seed=config.seed, shuffle=True
    )
    batch = next(iter(dataset))
    model, params = imported["gpt2"].model, imported["gpt2"].params
    logits = model.apply(
        {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"]
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["segment_ids"] > 0
    want = float(jnp.sum(losses * weights) / jnp.sum(weights))
    assert result.history[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_init_from_a_model_directory_checks_the_shapes(hf_dirs, converted):
    from jaxlm.sharding import logical_rules, make_mesh
    from jaxlm.train.init_from import load_init_params

    model_dir = converted["llama"]
    config = load_config(model_dir / "config.yaml", [f"init_from={model_dir}"])
    mesh, rules = make_mesh(config.mesh), logical_rules(config.mesh)
    _, abstract, _ = abstract_state(config, mesh, rules)
    assert _trees_equal(load_init_params(config, abstract), load_pretrained(model_dir).params)

    wider = config.replace(model={"d_ff": 128})
    _, abstract, _ = abstract_state(wider, mesh, rules)
    with pytest.raises(JaxlmError, match=r"parameter layers/mlp/down/kernel has shape"):
        load_init_params(wider, abstract)
    hf = wider.replace(init_from=f"hf:{hf_dirs['llama'][0]}")
    with pytest.raises(
        JaxlmError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\)"
    ):
        load_init_params(hf, abstract)


@pytest.mark.parametrize("name", ["gpt2", "llama_scaled"])
def test_greedy_generation_matches_transformers(hf_dirs, imported, name):
    """`generate_ids` (KV cache, prompts left-padded into one batch) gives the tokens
    transformers' greedy `generate` gives for each prompt alone."""
    from jaxlm.generation import generate_ids

    hf_dir, (ids, _, _), _ = hf_dirs[name]
    prompts = [ids[0, :6].tolist(), ids[1, :3].tolist()]
    model, params, _, _ = imported[name]
    got = generate_ids(model, params, prompts, max_new_tokens=10, temperature=0.0).tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0
            )
        assert tokens == out[0, len(prompt) :].tolist()


def test_bfloat16_checkpoint_loads_as_its_values(hf_dirs, imported, tmp_path):
    """Llama checkpoints ship in bf16, which numpy reads through ml_dtypes; the params
    are those values exactly, in the model's fp32."""
    import ml_dtypes

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"][0])
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    got = load_hf_pretrained(tmp_path / "bf16").params
    want = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
        imported["llama"].params,
    )
    assert _trees_equal(got, want)


def test_legacy_tensor_names_load(hf_dirs, imported, tmp_path):
    """The hub's `gpt2` files: no `transformer.` prefix and causal-mask buffers; old
    BERT files: LayerNorm `gamma`/`beta` and a stored copy of the tied decoder."""
    from safetensors.numpy import load_file, save_file

    for name, rename, extra in (
        ("gpt2", lambda k: k.removeprefix("transformer."), "h.0.attn.bias"),
        ("bert", lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma"), None),
    ):
        directory = tmp_path / name
        shutil.copytree(hf_dirs[name][0], directory)
        tensors = load_file(directory / "model.safetensors")
        legacy = {rename(k): v for k, v in tensors.items()}
        if extra:
            legacy[extra] = np.tril(np.ones((64, 64), np.float32))
        else:
            legacy["cls.predictions.decoder.weight"] = tensors[
                "bert.embeddings.word_embeddings.weight"
            ]
        save_file(legacy, directory / "model.safetensors")
        assert _trees_equal(load_hf_pretrained(directory).params, imported[name].params)


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    assert jaxlm_main(["convert", "from-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jaxlm: error: {tmp_path}: no config.json, not a Hugging Face model directory"
    assert jaxlm_main(["convert", "to-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a run or model directory" in capsys.readouterr().err
