"""A jaxlm sentencepiece `tokenizer.model` as a Hugging Face `tokenizer.json`, built
with the `tokenizers` package from the model's own pieces, so transformers'
`AutoTokenizer` encodes exactly as jaxlm does without sentencepiece or protobuf.

BPE merges are recovered from the vocabulary as transformers' own converter does: a
piece that splits into two pieces is a merge, ranked by the piece's score. Whitespace
becomes `▁`, with a dummy prefix on the text (sentencepiece's `add_dummy_prefix`);
digits are split when the model splits them; user-defined symbols stay whole; unknown
characters fall back to byte pieces. (Text right after a multi-character user symbol,
such as `<mask>`, gets a dummy prefix sentencepiece wouldn't give it: tokenizers
normalizes each stretch of text between added tokens on its own.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as spm_model
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from jaxlm.errors import JaxlmError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SPACE = "▁"


def _bpe_merges(pieces: list[Any]) -> list[tuple[str, str]]:
    vocab = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
    merges = []
    for piece in pieces:
        if piece.type != NORMAL:
            continue
        text = piece.piece
        pairs = [(text[:k], text[k:]) for k in range(1, len(text))]
        pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab]
        merges += [(piece.score, vocab[a], vocab[b], a, b) for a, b in pairs]
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(a, b) for _, _, _, a, b in merges]


def sentencepiece_to_tokenizer(model_path: str | Path) -> Tokenizer:
    proto = spm_model.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    pieces = list(proto.pieces)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unk = pieces[spec.unk_id].piece
    if spec.model_type == spm_model.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab, _bpe_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    elif spec.model_type == spm_model.TrainerSpec.UNIGRAM:
        vocab = [(p.piece, p.score) for p in pieces]
        model = models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=True)
    else:
        kind = spm_model.TrainerSpec.ModelType.Name(spec.model_type)
        raise JaxlmError(f"{model_path}: exporting a sentencepiece {kind} model is not supported")
    tokenizer = Tokenizer(model)
    # The dummy prefix goes on the whole text, before user-defined symbols are cut out
    # (they are matched on the normalized text), as sentencepiece does.
    steps = [normalizers.Prepend(SPACE)] if norm.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    if spec.split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []),
        ]
    )
    # A one-character user symbol (the newline) is a vocabulary entry no merge touches,
    # so the model alone keeps it whole; longer ones must be cut out of the raw text.
    symbols = [p.piece for p in pieces if p.type == USER_DEFINED and len(p.piece) > 1]
    tokenizer.add_tokens([AddedToken(s, special=False, normalized=False) for s in symbols])
    tokenizer.add_special_tokens(
        [AddedToken(p.piece, special=True) for p in pieces if p.type in (CONTROL, UNKNOWN)]
    )
    if spec.bos_id >= 0:
        bos = pieces[spec.bos_id].piece
        tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
        )
    return tokenizer


def special_tokens_of(model_path: str | Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings of a sentencepiece model, for tokenizer_config.json."""
    proto = spm_model.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    spec = proto.trainer_spec
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id}
    ids |= {"unk_token": spec.unk_id, "pad_token": spec.pad_id}
    return {key: proto.pieces[i].piece for key, i in ids.items() if i >= 0}


def export_sentencepiece(model_path: str | Path, out_dir: str | Path, max_len: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for `model_path` into `out_dir`."""
    out_dir = Path(out_dir)
    sentencepiece_to_tokenizer(model_path).save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        **special_tokens_of(model_path),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
