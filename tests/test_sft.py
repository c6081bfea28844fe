"""Supervised fine-tuning against transformers: chat templates render and tokenize as
`apply_chat_template` does, with its assistant masks; on tiny transformers-made Llama
and GPT-2 models the SFT loss and gradients are transformers' with -100 labels on the
prompt, and a prompt token's label changes nothing while a completion token's does; a
CLI fine-tuning run lowers the held-out loss; bad input is one line each.

Nothing is downloaded: tokenizers are trained here, models have random weights.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm.cli import main as jaxlm_main
from jaxlm.config import load_config
from jaxlm.data import chat, sft
from jaxlm.data.hf_tokenizer import load_hf_tokenizer
from jaxlm.errors import JaxlmError
from jaxlm.hf import load_hf_pretrained
from jaxlm.train.metrics import read_metrics
from jaxlm.train.objectives import causal_lm_loss

from .conftest import REPO
from .test_hf import _paragraphs
from .test_train_families import jaxlm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ_LEN = 128
CHAT_DATA = REPO / "data" / "xquad_qa_chat.jsonl"

# Meta-Llama-3-8B-Instruct's template (no {% generation %}: jaxlm renders prefixes).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
    "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same with the assistant's turn in {% generation %}, for transformers' own masks.
LLAMA3_TAGGED = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# ChatML (Qwen-style, with a default system turn) marked with {% generation %}.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_UNTAGGED = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
TEMPLATES = {  # name -> (special tokens, bos, eos, template)
    "llama3": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        LLAMA3,
    ),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML),
}

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Who is Romeo?"},
        {"role": "assistant", "content": "A Montague, in love."},
        {"role": "user", "content": "And Juliet?\nShe is  "},
        {"role": "assistant", "content": "  A Capulet: héllo, 日本 ünïcode. "},
    ],
    [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."}],
    [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Second"},
        {"role": "user", "content": "Third, with <|eot_id|> <|im_end|> in it"},
        {"role": "assistant", "content": "Fourth\n\nline"},
    ],
]


def _chat_tokenizer(directory: Path, name: str) -> int:
    """A byte-level BPE with the template family's special tokens; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos, template = TEMPLATES[name]
    directory.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_paragraphs(400), trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
    config |= {"bos_token": bos} if bos else {}
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config | {"chat_template": template})
    )
    return tok.get_vocab_size()


def _perturbed(model) -> None:
    with torch.no_grad():  # no zero biases or unit norms: every tensor's role shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tokenizer directories for each template, and tiny models: a Llama with the
    Llama-3-style tokenizer, a GPT-2 with a GPT-2 tokenizer (no chat template)."""
    from .test_hf import _bpe_tokenizer

    root = tmp_path_factory.mktemp("sft")
    vocab = {name: _chat_tokenizer(root / name, name) for name in TEMPLATES}
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab["llama3"],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ_LEN,
            rms_norm_eps=1e-6,
        )
    )
    _perturbed(llama)
    llama.save_pretrained(root / "llama3")
    (root / "gpt2").mkdir()
    gpt2_vocab = _bpe_tokenizer(root / "gpt2").get_vocab_size()
    config = transformers.GPT2Config(
        vocab_size=gpt2_vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=SEQ_LEN,
        bos_token_id=0,  # <|endoftext|>
        eos_token_id=0,
    )
    gpt2 = transformers.GPT2LMHeadModel(config)
    _perturbed(gpt2)
    gpt2.save_pretrained(root / "gpt2")
    return root


def _last_run(mask: list[int]) -> list[int]:
    """Only the last run of ones (the last assistant turn)."""
    out, i = [0] * len(mask), len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i], i = 1, i - 1
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_tokens_and_assistant_masks_match_transformers(hf_dirs, name):
    """Ids equal apply_chat_template's; masks equal its return_assistant_tokens_mask:
    ChatML marks the assistant with {% generation %} (jaxlm reads the tags, as
    transformers does); the Llama-3 template does not, so jaxlm renders prefixes and
    transformers' mask comes from the same template with the tags put in."""
    directory = hf_dirs / name
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    ours = load_hf_tokenizer(directory)
    assert ours.chat_template == TEMPLATES[name][3]
    tagged = {"llama3": LLAMA3_TAGGED, "chatml": CHATML}[name]
    for conversation in CONVERSATIONS:
        want = theirs.apply_chat_template(conversation, tokenize=True, return_dict=False)
        masks = theirs.apply_chat_template(
            conversation,
            chat_template=tagged,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert masks["input_ids"] == want  # the tagged twin renders the same text
        ids, mask = chat.encode_chat(ours, ours.chat_template, conversation)
        assert ids == want
        assert mask == masks["assistant_masks"]
        assert chat.encode_chat(ours, ours.chat_template, conversation, "last")[1] == _last_run(
            mask
        )
        assert chat.encode_chat(ours, ours.chat_template, conversation, "all")[1] == [1] * len(ids)
        if name == "chatml":  # without the tags, the prefix renderings give the same mask
            assert chat.encode_chat(ours, CHATML_UNTAGGED, conversation) == (ids, mask)
    text, _ = chat.render(ours.chat_template, CONVERSATIONS[1], ours.special_token_strings(), True)
    prompt = theirs.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True
    )
    assert text == prompt


def test_the_chat_template_is_found_where_transformers_finds_it(hf_dirs, tmp_path):
    """chat_template.jinja first, else tokenizer_config.json's (a string, or named
    templates of which `default` is used); copied with the tokenizer into a run."""
    import shutil

    from jaxlm.data.hf_tokenizer import copy_hf_tokenizer

    named, jinja = tmp_path / "named", tmp_path / "jinja"
    shutil.copytree(hf_dirs / "chatml", named)
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": LLAMA3},
        {"name": "default", "template": CHATML_UNTAGGED},
    ]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copytree(hf_dirs / "chatml", jinja)
    (jinja / "chat_template.jinja").write_text(CHATML_UNTAGGED)
    for directory in (named, jinja):
        theirs = transformers.AutoTokenizer.from_pretrained(directory)
        assert theirs.get_chat_template() == CHATML_UNTAGGED
        assert load_hf_tokenizer(directory).chat_template == CHATML_UNTAGGED
    run = tmp_path / "run"
    run.mkdir()
    assert "chat_template.jinja" in copy_hf_tokenizer(jinja / "tokenizer.json", run)
    assert load_hf_tokenizer(run).chat_template == CHATML_UNTAGGED
    assert load_hf_tokenizer(hf_dirs / "gpt2").chat_template is None  # GPT-2 has none


def test_default_template_on_a_sentencepiece_tokenizer(tmp_path):
    """jaxlm's own tokenizers get DEFAULT_CHAT_TEMPLATE: its text is as documented, and
    the counted tokens are exactly each assistant turn's content and the EOS after it."""
    from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer

    sp = load_tokenizer(train_tokenizer(_paragraphs(1000), tmp_path / "t.model", 384, "bpe"))
    conversation = CONVERSATIONS[0]
    text, _ = chat.render(chat.DEFAULT_CHAT_TEMPLATE, conversation, chat.special_strings(sp))
    assert text == (
        "<s>System:\nYou are terse.\n\nUser:\nWho is Romeo?\n\nAssistant:\nA Montague, in "
        "love.</s>User:\nAnd Juliet?\nShe is  \n\nAssistant:\n  A Capulet: héllo, 日本 "
        "ünïcode. </s>"
    )
    ids, mask = chat.encode_chat(sp, chat.DEFAULT_CHAT_TEMPLATE, conversation)
    assert ids[0] == sp.bos_id() and ids.count(sp.eos_id()) == 2
    counted = [i for i, m in zip(ids, mask, strict=True) if m]
    turns = [m["content"] for m in conversation if m["role"] == "assistant"]
    first = counted.index(sp.eos_id())
    assert counted[first] == counted[-1] == sp.eos_id()
    newline = sp.piece_to_id("\n")  # decoded first, it keeps a leading space as it is

    def decode(pieces):
        return sp.decode([newline, *pieces])[1:]

    assert [decode(counted[:first]), decode(counted[first + 1 : -1])] == turns
    # The prompt the model gets at inference ends where the trained tokens begin.
    prompt, _ = chat.render(
        chat.DEFAULT_CHAT_TEMPLATE, conversation[:2], {"bos_token": "<s>"}, True
    )
    assert prompt.endswith("Who is Romeo?\n\nAssistant:\n")


def _examples(name: str) -> list[sft.Record]:
    """Llama: conversations; GPT-2: prompt/completion pairs."""
    if name == "llama3":
        return [sft.Record("x", i + 1, messages=tuple(c)) for i, c in enumerate(CONVERSATIONS)]
    texts = _paragraphs(12)[-8:]
    return [
        sft.Record("x", i + 1, prompt=texts[2 * i][:50], completion=" " + texts[2 * i + 1][:25])
        for i in range(4)
    ]


def _hf_labels(name: str, directory: Path, record: sft.Record) -> tuple[list[int], list[int]]:
    """Ids and -100-masked labels built by transformers alone."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    if name == "llama3":
        out = tok.apply_chat_template(
            list(record.messages),
            chat_template=LLAMA3_TAGGED,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = out["input_ids"], out["assistant_masks"]
    else:
        prompt = tok(record.prompt, add_special_tokens=False)["input_ids"]
        completion = tok(record.completion, add_special_tokens=False)["input_ids"]
        ids = [tok.eos_token_id, *prompt, *completion, tok.eos_token_id]
        mask = [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)
    return ids, [i if m else -100 for i, m in zip(ids, mask, strict=True)]


def _torch_loss_and_grads(model, examples: list[tuple[list[int], list[int]]]):
    """Mean cross-entropy over every example's counted tokens (transformers' loss,
    summed over examples and divided by the total count), and its gradients."""
    model.zero_grad()
    total, count = 0.0, 0
    for ids, labels in examples:
        n = sum(label != -100 for label in labels[1:])
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        total = total + out.loss * n
        count += n
    loss = total / count
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def _packed_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Every row of the SFT packer (one row per batch, so none is dropped)."""
    stream = sft.sft_stream(
        rows, None, 0, 1, seq_len=SEQ_LEN, rows=1, seed=0, shuffle=False, repeat=False
    )
    batches = list(stream)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("name", ["llama3", "gpt2"])
def test_sft_loss_counts_only_completion_tokens(hf_dirs, name):
    from jaxlm.hf import architecture_of
    from jaxlm.hf.links import hf_tensors

    directory = hf_dirs / name
    model, params, tokenizer, config = load_hf_pretrained(directory)
    d = load_config(None, ["data.format=sft"]).data
    template = tokenizer.chat_template if name == "llama3" else None
    encode = sft.Encoder(tokenizer, d, template)
    records = _examples(name)
    encoded = [encode(r) for r in records]
    reference = [_hf_labels(name, directory, r) for r in records]
    for (ids, weights), (want_ids, labels) in zip(encoded, reference, strict=True):
        assert ids.tolist() == want_ids  # the same tokens ...
        assert [i if w else -100 for i, w in zip(ids, weights, strict=True)] == labels  # counted
    rows = [sft.to_row(ids, w, SEQ_LEN)[0] for ids, w in encoded]
    batch = _packed_batch(rows)
    assert len(batch["inputs"]) < len(rows)  # examples share rows ...
    for row in range(len(batch["inputs"])):  # ... whole, each its own segment from position 0
        seg = batch["segment_ids"][row]
        for s in set(seg.tolist()) - {0}:
            inputs = batch["inputs"][row][seg == s].tolist()
            assert inputs in [r["inputs"].tolist() for r in rows]
            assert batch["positions"][row][seg == s].tolist() == list(range(len(inputs)))

    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: causal_lm_loss(model, p, b)[0]))
    loss, grads = grad_fn(params, batch)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    want_loss, want_grads = _torch_loss_and_grads(torch_model, reference)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    m = config.model.resolved()
    for hf_name, grad in hf_tensors(architecture_of(m).links(m), grads, m.n_layers, m.scan_layers):
        np.testing.assert_allclose(grad, want_grads[hf_name], atol=2e-6, rtol=1e-3, err_msg=hf_name)

    # The literal check: the labels (next tokens) behind the prompt's targets changed,
    # inputs kept, give the same loss and gradients; one completion label changed does not.
    rng = np.random.default_rng(0)

    def relabeled(changed: int | None) -> dict[str, np.ndarray]:
        out = []
        for k, (ids, w) in enumerate(encoded):
            labels = ids[1:].copy()
            prompt = w[1:] == 0
            labels[prompt] = rng.integers(0, m.vocab_size, int(prompt.sum()))
            if k == changed:
                first = int(np.argmax(w[1:]))
                labels[first] = (labels[first] + 1) % m.vocab_size
            out.append({"inputs": ids[:-1], "targets": sft.targets_of(labels, w[1:])})
        return _packed_batch(out)

    same_loss, same_grads = grad_fn(params, relabeled(None))
    assert float(same_loss) == float(loss)
    assert all(jax.tree_util.tree_leaves(jax.tree.map(np.array_equal, same_grads, grads)))
    other_loss, other_grads = grad_fn(params, relabeled(1))
    assert float(other_loss) != float(loss)
    assert not all(jax.tree_util.tree_leaves(jax.tree.map(np.array_equal, other_grads, grads)))

    if name == "llama3":  # `jaxlm eval`'s path scores SFT records on the same tokens
        from jaxlm.evaluation import evaluate_model

        pretrained = load_hf_pretrained(directory)
        pretrained.config = pretrained.config.replace(train={"seq_len": SEQ_LEN})
        results = evaluate_model(pretrained, records, batch_size=2)
        assert results["loss"] == pytest.approx(want_loss, rel=1e-5)
        assert results["tokens"] == sum(sum(w[1:]) for _, w in encoded)


def test_truncation_sides_and_the_report(hf_dirs):
    tokenizer = load_hf_tokenizer(hf_dirs / "gpt2")
    d = load_config(None, ["data.format=sft"]).data
    long = sft.Record("f", 1, prompt="a " * 40, completion=" b" * 10)
    late = sft.Record("f", 2, prompt="a " * 60, completion=" b")
    short = sft.Record("f", 3, prompt="c", completion=" d")
    encode = sft.Encoder(tokenizer, d)
    ids, w = encode(long)
    assert len(ids) > 21 and w[:21].sum() == 0  # the completion lies past 21 tokens
    right, cut = sft.to_row(ids, w, 20)
    assert cut and right is None  # its start kept: nothing left to train on
    left, cut = sft.to_row(ids, w, 20, "left")
    assert cut and left["inputs"].tolist() == ids[-21:-1].tolist()
    counted = w[-20:] > 0
    assert left["targets"][counted].tolist() == ids[-20:][counted].tolist()
    assert (left["targets"][~counted] == sft.IGNORE_TARGET).all()
    ids, w = encode(short)
    row, cut = sft.to_row(ids, w, 20)
    assert not cut and row["inputs"].tolist() == ids[:-1].tolist()
    rows, report = sft.encode_records([long, late, short], tokenizer, d, 20)
    assert (report.examples, report.truncated, report.skipped, len(rows)) == (3, 2, 2, 1)
    line = sft.describe(report, sft.Report(), d, 20)
    assert (
        "2 of 3 examples are longer than train.seq_len + 1 = 21 tokens and were truncated "
        "from the right (data.truncation_side); 2 kept no trained token and were skipped "
        "(first: data file f, line 1)"
    ) in line


def test_sft_stream_resumes_where_it_stopped(hf_dirs):
    """The packed stream's position (what checkpoints save per stream) restores to the
    same next batches."""
    from jaxlm.data.pipeline import make_dataset

    tokenizer = load_hf_tokenizer(hf_dirs / "gpt2")
    d = load_config(None, ["data.format=sft"]).data
    texts = _paragraphs(40)
    records = [sft.Record("f", i, prompt=t[:40], completion=t[40:90]) for i, t in enumerate(texts)]
    rows, _ = sft.encode_records(records, tokenizer, d, 64)
    it = iter(
        make_dataset(
            rows,
            tokenizer,
            seq_len=64,
            batch_size=4,
            seed=3,
            num_streams=2,
            make_stream=sft.sft_stream,
        )
    )
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(4)]
    it.set_state(state)
    for batch in want:
        got = next(it)
        assert all(np.array_equal(got[k], batch[k]) for k in batch)
    assert set(want[0]) == {"inputs", "targets", "segment_ids", "positions"}


def _chat_gpt2(directory: Path) -> None:
    """A tiny GPT-2 with a byte-level BPE trained on the bundled chat data, and no chat
    template (as GPT-2's own): jaxlm's default template renders the conversations."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = load_config(None, [f"data.path={CHAT_DATA}"]).data
    texts = sft.corpus(sft.read_records(str(CHAT_DATA), d))
    directory.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer"})
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=0,  # <|endoftext|>
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)


CLI_STEPS = 100
CLI_MARGIN = 0.75  # nats below the starting model's held-out loss (measured: 6.95 -> 5.90)


def test_cli_fine_tunes_an_imported_model(tmp_path):
    """`jaxlm train configs/sft-gpt2-tiny.yaml init_from=hf:DIR`: the architecture and
    tokenizer come from DIR, the held-out SFT loss (assistant tokens only) falls."""
    hf_dir, run_dir = tmp_path / "hf", tmp_path / "run"
    _chat_gpt2(hf_dir)
    out = jaxlm(
        "train",
        "configs/sft-gpt2-tiny.yaml",
        f"init_from=hf:{hf_dir}",
        f"data.path={CHAT_DATA}",
        "train.seq_len=256",
        "train.batch_size=4",
        f"train.steps={CLI_STEPS}",
        f"train.eval_every={CLI_STEPS}",
        "train.log_every=50",
        "data.truncation_side=left",
        "optim.lr=3e-3",
        f"checkpoint.every={CLI_STEPS}",
        "train.tensorboard=false",
        "--run-dir",
        str(run_dir),
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "template: jaxlm's default chat template" in out.stdout
    assert "were truncated from the left (data.truncation_side)" in out.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    start, last = records[0], records[-1]
    assert start["step"] == 0 and "loss" not in start  # eval_on_start: the imported model
    assert last["step"] == CLI_STEPS
    assert last["eval_loss"] < start["eval_loss"] - CLI_MARGIN, (start, last)
    saved = load_config(run_dir / "config.yaml")
    assert (saved.model.d_model, saved.model.max_len, saved.model.vocab_size) == (64, 256, 1024)


@pytest.fixture(scope="module")
def bad(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_sft")
    lines = {
        "no_fields.jsonl": ['{"prompt": "a", "completion": "b"}', '{"question": "a"}'],
        "no_completion.jsonl": ['{"prompt": "a"}'],
        "empty.jsonl": ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": " "}'],
        "chat.jsonl": [json.dumps({"messages": CONVERSATIONS[0]})] * 3,
    }
    for name, content in lines.items():
        (root / name).write_text("\n".join(content) + "\n")
    (root / "no_system.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (root / "syntax.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
    return root


BAD_CASES = [
    (
        "no_fields.jsonl",
        [],
        "data file {d}/no_fields.jsonl, line 2: no 'messages' list and no "
        "'prompt'/'completion' strings (set data.messages_field, or data.prompt_field and "
        "data.completion_field)",
    ),
    (
        "no_completion.jsonl",
        [],
        "data file {d}/no_completion.jsonl, line 1: no string field "
        "'completion' (set data.completion_field)",
    ),
    ("empty.jsonl", [], "data file {d}/empty.jsonl, line 2: empty completion (field 'completion')"),
    (
        "chat.jsonl",
        ["data.chat_template={d}/no_system.jinja"],
        "data file {d}/chat.jsonl, line 1: "
        "the chat template fails to render the conversation: System role not supported",
    ),
    (
        "chat.jsonl",
        ["data.chat_template={d}/syntax.jinja"],
        "{d}/syntax.jinja: the chat template "
        "is not valid Jinja (template line 1: Unexpected end of template.",
    ),
]


BAD_IDS = ["no_fields", "no_completion", "empty_completion", "template_raises", "template_syntax"]


@pytest.mark.parametrize("data, extra, message", BAD_CASES, ids=BAD_IDS)
def test_bad_sft_input_is_one_line(hf_dirs, bad, capsys, data, extra, message):
    """Each fails before any model is built, with exit code 2 and one line."""
    code = jaxlm_main(
        [
            "train",
            "configs/sft-gpt2-tiny.yaml",
            f"init_from=hf:{hf_dirs / 'gpt2'}",
            f"data.path={bad / data}",
            "train.seq_len=64",
            *[e.format(d=bad) for e in extra],
            "--run-dir",
            str(bad / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"jaxlm: error: {message.format(d=bad)}"), err
    assert err.count("\n") == 1
    assert not (bad / "run" / "checkpoints").exists()


def test_config_checks():
    for key, value, message in [
        ("data.format", "chat", "must be auto, text or sft"),
        ("data.train_on", "prompt", "must be assistant, last or all"),
        ("data.truncation_side", "middle", "must be right or left"),
    ]:
        with pytest.raises(JaxlmError, match=f"config key '{key}': {message}"):
            load_config(None, [f"{key}={value}"])
    with pytest.raises(JaxlmError, match="sft trains decoders"):
        load_config(REPO / "configs" / "t5-tiny.yaml", ["data.format=sft"])
