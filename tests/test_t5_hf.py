"""Hugging Face T5 in and out, against transformers itself: tiny random
`T5ForConditionalGeneration`s of both generations, T5 v1.0 (ReLU, tied head rescaled by
d_model**-0.5) and v1.1 / flan-t5 (gated tanh-GELU, its own unscaled head, d_kv * heads
!= d_model, a shallower decoder, other buckets), are imported and must give
transformers' logits on a padded batch and its greedy tokens; converted to a jaxlm
model directory and back, transformers loads them with no missing tensor and the same
logits, and the tokenizer encodes as transformers' T5 tokenizer does.

Nothing is downloaded: weights are random and the tokenizer is trained here.
"""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.cli import main as jaxlm_main
from jaxlm.errors import JaxlmError
from jaxlm.hf import convert_from_hf, load_hf_pretrained
from jaxlm.pretrained import load_pretrained, load_tokenizer_dir

from .conftest import CORPUS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SRC, REAL, TGT = 12, 7, 6  # the second source row is right-padded after REAL tokens
ATOL = 1e-4
CONFIGS = {
    "v1_0": dict(num_layers=2, num_heads=4, d_kv=8, feed_forward_proj="relu"),
    "v1_1": dict(
        num_layers=2,
        num_decoder_layers=1,
        num_heads=4,
        d_kv=6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=10,
    ),
}
SPECIALS = ["<pad>", "</s>", "<unk>", "<extra_id_0>", "<extra_id_1>"]


def _tokenizer(directory):
    """A T5-style unigram tokenizer.json (pad 0, eos 1, unk 2, `</s>` appended)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing

    text = CORPUS.read_text()[:20000].lower()
    tok = SentencePieceUnigramTokenizer()
    tok.train_from_iterator(
        text.split("\n"), vocab_size=100, special_tokens=SPECIALS, unk_token="<unk>"
    )
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": 0,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    src = rng.integers(3, vocab, (2, SRC))
    src_mask = np.ones((2, SRC), np.int64)
    src_mask[1, REAL:] = 0
    src[1, REAL:] = 0
    tgt_in = rng.integers(3, vocab, (2, TGT))
    tgt_in[:, 0] = 0  # T5's decoder start: pad
    return src, src_mask, tgt_in


def _hf_logits(model, src, src_mask, tgt_in):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(src_mask),
            decoder_input_ids=torch.tensor(tgt_in),
        )
    return out.logits.numpy()


_APPLY = {}  # one compile per architecture: the round trip reuses the import's


def _jaxlm_logits(model, params, src, src_mask, tgt_in):
    apply = _APPLY.setdefault(model.config, jax.jit(model.apply))
    args = (jnp.asarray(src), jnp.asarray(tgt_in), jnp.asarray(src_mask))
    return np.asarray(apply({"params": params}, *args))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (HF directory, batch, transformers' logits, the transformers model)."""
    root = tmp_path_factory.mktemp("t5hf")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    vocab = _tokenizer(tok_dir)
    torch.manual_seed(0)
    out = {}
    for name, kw in CONFIGS.items():
        config = transformers.T5Config(
            vocab_size=vocab, d_model=32, d_ff=64, decoder_start_token_id=0, **kw
        )
        model = transformers.T5ForConditionalGeneration(config).eval()
        if name == "v1_1":  # flan-t5's head is its own matrix
            model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 32) * 0.1)
        with torch.no_grad():  # no unit norms or zero tables: every tensor's role shows
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        directory = root / name
        model.save_pretrained(directory)
        for f in tok_dir.iterdir():
            shutil.copyfile(f, directory / f.name)
        batch = _batch(vocab)
        out[name] = (directory, batch, _hf_logits(model, *batch), model)
    # A v1.1 whose head is still the embedding: transformers 5 saves no lm_head.weight.
    same = copy.deepcopy(model)
    same.lm_head.weight = same.shared.weight
    same.save_pretrained(root / "v1_1_same_head")
    out["v1_1_same_head"] = (root / "v1_1_same_head", batch, _hf_logits(same, *batch), same)
    return out


@pytest.fixture(scope="module")
def imported(hf_dirs):
    return {name: load_hf_pretrained(hf_dirs[name][0]) for name in CONFIGS}


@pytest.mark.parametrize("name", CONFIGS)
def test_import_matches_transformers(hf_dirs, imported, name):
    _, batch, want, _ = hf_dirs[name]
    model, params, tokenizer, config = imported[name]
    np.testing.assert_allclose(_jaxlm_logits(model, params, *batch), want, atol=ATOL, rtol=0)
    m = config.model
    assert tokenizer is not None and m.vocab_size == tokenizer.get_piece_size()
    if name == "v1_0":
        assert (m.mlp, m.tie_embeddings, m.head_dim) == ("relu", True, 8)
        assert "lm_head" not in params
    else:
        assert (m.mlp, m.tie_embeddings, m.head_dim, m.n_decoder_layers) == ("geglu", False, 6, 1)
        assert (m.relative_buckets, m.relative_max_distance) == (8, 10)
        assert params["lm_head"]["kernel"].shape == (32, m.vocab_size)
        assert "relpos" not in params["decoder"]["layers_0"]["cross_attn"]


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_matches_transformers(hf_dirs, imported, name):
    """`generate_ids` (encoder padding masked, decoder from the KV cache) gives the
    tokens of transformers' greedy `generate` on the same padded batch."""
    from jaxlm.generation import generate_ids

    _, (src, src_mask, _), _, hf = hf_dirs[name]
    model, params, _, _ = imported[name]
    prompts = [src[0].tolist(), src[1, :REAL].tolist()]
    got = generate_ids(model, params, prompts, max_new_tokens=10, temperature=0.0).tokens
    hf.generation_config.eos_token_id = None  # all 10 tokens, as jaxlm without eos_id
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(src_mask),
            max_new_tokens=10,
            do_sample=False,
            num_beams=1,
        )
    assert out[:, 0].tolist() == [0, 0]  # the decoder start, which jaxlm doesn't return
    assert got == out[:, 1:].tolist()


@pytest.mark.parametrize("name", CONFIGS)
def test_convert_round_trip_loads_in_transformers(hf_dirs, imported, tmp_path, name):
    """from-hf -> jaxlm model directory -> to-hf: transformers loads every tensor (none
    missing, none left over) and gives the original logits; load_pretrained reads the
    model directory as the import; the tokenizer encodes as transformers' T5's."""
    hf_dir, batch, want, _ = hf_dirs[name]
    model_dir, out = tmp_path / "jaxlm", tmp_path / "hf"
    assert jaxlm_main(["convert", "from-hf", str(hf_dir), str(model_dir)]) == 0
    model, params, _, _ = load_pretrained(model_dir)
    np.testing.assert_allclose(_jaxlm_logits(model, params, *batch), want, atol=ATOL, rtol=0)
    assert jaxlm_main(["convert", "to-hf", str(model_dir), str(out)]) == 0
    loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_allclose(_hf_logits(loaded.eval(), *batch), want, atol=1e-6, rtol=0)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["decoder_start_token_id"] == 0 and hf_config["eos_token_id"] == 1
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer_dir(out)
    for text in CORPUS.read_text()[20000:21000].lower().split("\n")[:20]:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text


def test_unscaled_head_saved_as_the_embedding(hf_dirs, imported):
    """transformers 5 drops `lm_head.weight` when it is the embedding; with
    `scale_decoder_outputs: false` the head is then an unscaled copy of it."""
    from safetensors import safe_open

    directory, batch, want, _ = hf_dirs["v1_1_same_head"]
    with safe_open(str(directory / "model.safetensors"), "np") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    model, params, _, _ = load_hf_pretrained(directory)
    np.testing.assert_allclose(_jaxlm_logits(model, params, *batch), want, atol=ATOL, rtol=0)
    assert not np.allclose(want, hf_dirs["v1_1"][2], atol=1e-2)  # a different head
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["embed"]["embedding"].T)


def test_spiece_model_alone_is_the_tokenizer(hf_dirs, tmp_path):
    """A directory with only T5's sentencepiece `spiece.model` (pad 0, eos 1, unk 2, no
    BOS): it is the tokenizer, encoding as transformers' T5Tokenizer made from it."""
    import sentencepiece as spm

    directory = tmp_path / "spiece"
    shutil.copytree(hf_dirs["v1_0"][0], directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    lines = CORPUS.read_text()[:20000].lower().split("\n")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(directory / "spiece"),
        vocab_size=80,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (directory / "spiece.vocab").unlink()
    tokenizer = load_hf_pretrained(directory).tokenizer
    theirs = transformers.T5Tokenizer.from_pretrained(directory, extra_ids=0)
    for text in lines[-20:]:
        assert tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert (tokenizer.pad_id(), tokenizer.eos_id(), tokenizer.bos_id()) == (0, 1, -1)
    out = convert_from_hf(directory, tmp_path / "jaxlm")  # kept as jaxlm's tokenizer.model
    assert (out / "tokenizer.model").read_bytes() == (directory / "spiece.model").read_bytes()
    assert load_pretrained(out).config.tokenizer.path == str(out / "tokenizer.model")


def test_bad_t5_config_names_the_key(hf_dirs, tmp_path):
    directory = tmp_path / "silu"
    shutil.copytree(hf_dirs["v1_0"][0], directory)
    config = json.loads((directory / "config.json").read_text())
    config["feed_forward_proj"] = "gated-silu"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(JaxlmError, match="feed_forward_proj='gated-silu' is not supported"):
        load_hf_pretrained(directory)
    from jaxlm.model_config import ModelConfig, validate_model

    with pytest.raises(JaxlmError, match="model.d_kv"):
        validate_model(ModelConfig(family="llama", d_kv=8))
    assert validate_model(ModelConfig(family="t5", d_model=32, n_heads=3, d_kv=6)).head_dim == 6
