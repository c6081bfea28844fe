"""`jaxlm.pipeline` and `jaxlm generate` on model directories written by
`save_pretrained`: the output format and keywords of Hugging Face's pipelines, and
texts equal to decoding `generate_ids`'s tokens with the same tokenizer."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import jaxlm
from jaxlm import cli_use
from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import JaxlmError
from jaxlm.generation import generate_ids
from jaxlm.models import build_model
from jaxlm.pretrained import save_pretrained

from .conftest import CORPUS, TINY

PROMPT = "The world is a beautiful place."
NEW = 12


def _model_dir(path, tokenizer_file, extra):
    config = load_config(None, [*TINY, "model.vocab_size=512", "tokenizer.vocab_size=512", *extra])
    model = build_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(shapes["params"]))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    save_pretrained(path, config, jax.tree_util.tree_unflatten(tree, params))
    (path / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    docs = read_documents(str(CORPUS), "text", "paragraph")[:400]
    spm_file = train_tokenizer(docs, root / "spm.model", 512)
    gpt = _model_dir(root / "gpt", spm_file, ["model.n_layers=1"])
    t5 = _model_dir(root / "t5", spm_file, ["model.family=t5", "model.n_layers=1"])
    return gpt, t5, load_tokenizer(spm_file)


@pytest.fixture(scope="module")
def generator(dirs):
    return jaxlm.pipeline("text-generation", model=dirs[0], max_new_tokens=NEW)


def _api_text(pipe, tok, ids_in, **kw):
    ids = generate_ids(pipe.model, pipe.params, [ids_in], max_new_tokens=NEW, **kw).tokens[0]
    return tok.decode([t for t in ids if t != tok.eos_id()])


def test_text_generation_format_and_greedy_text(generator, dirs):
    tok = dirs[2]
    out = generator(PROMPT)
    new = _api_text(generator, tok, [tok.bos_id(), *tok.encode(PROMPT)], eos_id=tok.eos_id())
    assert out == [{"generated_text": PROMPT + new}]
    assert new  # the model did continue
    both = generator([PROMPT, "ROMEO:"], return_full_text=False)
    assert [len(rows) for rows in both] == [1, 1]
    assert both[0] == [{"generated_text": new}]


def test_sampling_keywords(generator):
    kw = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, num_return_sequences=3)
    first = generator(PROMPT, seed=7, **kw)
    assert len(first) == 3 and all(r["generated_text"].startswith(PROMPT) for r in first)
    assert generator(PROMPT, seed=7, **kw) == first
    assert len({r["generated_text"] for r in first}) > 1
    with pytest.raises(JaxlmError, match="do_sample"):
        generator(PROMPT, num_return_sequences=2)
    with pytest.raises(JaxlmError, match="unknown keyword 'max_length'"):
        generator(PROMPT, max_length=5)
    with pytest.raises(JaxlmError, match="unknown task"):
        jaxlm.pipeline("summarization", model="nowhere")


def test_text2text_generation(dirs):
    t5_dir, tok = dirs[1], dirs[2]
    with pytest.raises(JaxlmError, match="needs a decoder-only model"):
        jaxlm.pipeline("text-generation", model=t5_dir)
    pipe = jaxlm.pipeline("text2text-generation", model=t5_dir)
    out = pipe([PROMPT], max_new_tokens=NEW)
    src = [*tok.encode(PROMPT), tok.eos_id()]
    new = _api_text(pipe, tok, src, eos_id=tok.eos_id(), decoder_start_id=tok.bos_id())
    assert out == [[{"generated_text": new}]]
    with pytest.raises(JaxlmError, match="unknown keyword 'return_full_text'"):
        pipe(PROMPT, return_full_text=False)


def test_cli_generate_matches_the_python_api(generator, dirs, tmp_path, capsys, monkeypatch):
    """Prompts from the command line and a file, one generation call per prompt (the
    CLI batches them, here by one), equal one call of the Python API on all of them."""
    monkeypatch.setattr(cli_use, "GENERATE_BATCH", 1)
    gpt = str(dirs[0])
    expected = generator([PROMPT, "ROMEO:"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n")
    args = ["generate", gpt, "--prompt", PROMPT, "--prompt-file", str(prompts), "--greedy"]
    assert main([*args, "--max-new-tokens", str(NEW), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["generated_text"] for x in lines] == [r[0]["generated_text"] for r in expected]
    # A stop string ends the text right after it.
    new = expected[0][0]["generated_text"][len(PROMPT) :]
    stop = new[2:5]
    assert main([*args[:4], "--greedy", "--max-new-tokens", str(NEW), "--stop", stop]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text == PROMPT + new[: new.index(stop) + len(stop)]
    assert main(["generate", gpt]) == 2
    assert "needs --prompt" in capsys.readouterr().err
