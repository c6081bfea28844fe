"""BERT's extractive QA head against transformers' `BertForQuestionAnswering`: a tiny
random checkpoint imports with its start/end logits, exports back in that format,
and `jaxlm convert` round-trips it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.cli import main as jaxlm_main
from jaxlm.hf import load_hf_pretrained
from jaxlm.pretrained import load_pretrained

from .test_hf import _batch, _trees_equal, _wordpiece_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_qa(tmp_path_factory):
    """(HF directory, batch, transformers' start and end logits) of a tiny random model."""
    root = tmp_path_factory.mktemp("hf_qa")
    vocab = _wordpiece_tokenizer(root).get_vocab_size()
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(config).eval()
    with torch.no_grad():  # no zero biases or unit norms: every tensor's role shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root)
    batch = _batch(vocab)
    return root, batch, _hf_logits(model, *batch)


def _hf_logits(model, ids, mask, types):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    return out.start_logits.numpy(), out.end_logits.numpy()


def _jaxlm_logits(model, params, ids, mask, types):
    out = jax.jit(model.apply)(
        {"params": params}, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask)
    )
    return tuple(np.asarray(x) for x in out)


def _assert_match(got, want, mask, atol=ATOL):
    real = mask.astype(bool)  # padding's logits are not compared
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[real], w[real], atol=atol, rtol=0)


def test_qa_checkpoint_imports_and_exports_in_transformers_format(hf_qa, tmp_path):
    hf_dir, (ids, mask, types), want = hf_qa
    imported = load_hf_pretrained(hf_dir)
    assert imported.config.model.head == "qa" and not imported.config.model.nsp_head
    assert set(imported.params) == {"encoder", "qa_outputs"}
    assert "pooler" not in imported.params["encoder"]
    assert imported.params["qa_outputs"]["kernel"].shape == (32, 2)
    _assert_match(_jaxlm_logits(imported.model, imported.params, ids, mask, types), want, mask)

    model_dir, out = tmp_path / "jaxlm", tmp_path / "hf"
    assert jaxlm_main(["convert", "from-hf", str(hf_dir), str(model_dir)]) == 0
    loaded = load_pretrained(model_dir)
    assert loaded.config.model.head == "qa"
    assert _trees_equal(loaded.params, imported.params)
    assert jaxlm_main(["convert", "to-hf", str(model_dir), str(out)]) == 0
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForQuestionAnswering"]
    back = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    _assert_match(_hf_logits(back, ids, mask, types), want, mask, atol=1e-6)
    assert _trees_equal(load_hf_pretrained(out).params, imported.params)
