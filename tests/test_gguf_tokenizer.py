"""A tokenizer read from GGUF metadata gives the ids and text of the Hugging Face tokenizer the
vocabulary came from: byte-level BPE under each pre-tokenizer name, and SentencePiece
vocabularies (`llama`) against transformers' conversion and against sentencepiece itself."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFWriter, TokenType
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as ReferenceTokenizer
from tokenizers.implementations import SentencePieceBPETokenizer
from tokenizers.models import BPE

from exo.errors import InvalidModelError
from exo.inference.tokenizers import IncrementalDetokenizer, Tokenizer
from exo.testing.corpus import CORPUS
from exo.testing.synth import PRESETS, cached_model

TEXTS = [
    CORPUS,
    "",
    "Größe 日本語 🙂🚀 café naïve Ωμέγα",
    "  leading, trailing and   inner   spaces  ",
    "tabs\tand\nnewlines\n\n\r\nmixed \n \n",
    "digits 1234567 3.14159 2024-12-04 1,000,000",
    "it's they'll we'd I'M YOU'RE",
    "   ",
    "word" * 50,
]

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def _regex_split(regex: str) -> Any:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def as_llama3(spec: dict[str, Any]) -> None:
    """Llama 3's tokenizer.json: its regex, then bytes; a word in the vocabulary is taken whole."""
    spec["pre_tokenizer"] = json.loads(_regex_split(LLAMA3_REGEX).__getstate__())
    spec["model"]["ignore_merges"] = True


def as_qwen2(spec: dict[str, Any]) -> None:
    """Qwen2's tokenizer.json: NFC, its regex (single digits), then bytes."""
    spec["normalizer"] = json.loads(normalizers.NFC().__getstate__())
    spec["pre_tokenizer"] = json.loads(_regex_split(QWEN2_REGEX).__getstate__())


def as_gpt2(spec: dict[str, Any]) -> None:
    """The synthetic tokenizer as trained: GPT-2's byte-level pre-tokenizer."""


PRE_TOKENIZERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "gpt-2": as_gpt2,
    "llama-bpe": as_llama3,
    "qwen2": as_qwen2,
}


def write_vocab_gguf(path: Path, arch: str, vocab: dict[str, Any]) -> Path:
    """A GGUF holding only tokenizer metadata (`vocab`: tokenizer.ggml.* values by short name)."""
    writer = GGUFWriter(path, arch)
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_add_bos_token(vocab["add_bos"])
    if "unk" in vocab:
        writer.add_unk_token_id(vocab["unk"])
    if "chat_template" in vocab:
        writer.add_chat_template(vocab["chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def byte_level_vocab(spec: dict[str, Any], config: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """What llama.cpp's converter stores for a byte-level BPE tokenizer.json: tokens by id
    (padded to the model's vocabulary with unused `[PADn]`), added special tokens as control
    tokens, and the merges as `a b` strings."""
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    by_id |= {t["id"]: t["content"] for t in spec["added_tokens"]}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [
        TokenType.CONTROL if i in special else TokenType.NORMAL if i in by_id else TokenType.UNUSED
        for i in range(vocab_size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    bos = config["bos_token"] or config["pad_token"]
    return {
        "model": "gpt2",
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tokens.index(bos),
        "eos": tokens.index(config["eos_token"]),
        "add_bos": config["bos_token"] is not None,
        "chat_template": config["chat_template"],
    }


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def preset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, cached_model(request.param, tmp_path_factory.getbasetemp() / "synth")


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_byte_level_bpe_matches_the_reference(preset: tuple[str, Path], pre: str, tmp_path: Path) -> None:
    name, model_dir = preset
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    PRE_TOKENIZERS[pre](spec)
    reference = ReferenceTokenizer.from_str(json.dumps(spec))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = byte_level_vocab(spec, config, PRESETS[name].config["vocab_size"]) | {"pre": pre}
    tokenizer = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "vocab.gguf", "llama", vocab))

    specials = [t["content"] for t in spec["added_tokens"]]
    texts = [*TEXTS, f"{specials[1]}user\nhi {specials[-1]}\n{specials[0]}x", "".join(specials)]
    for text in texts:
        for add_special_tokens in (True, False):
            expected = reference.encode(text, add_special_tokens=add_special_tokens).ids
            assert tokenizer.encode(text, add_special_tokens) == expected, (pre, text)
        ids = reference.encode(text, add_special_tokens=False).ids
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip)
    assert tokenizer.decode(tokenizer.encode(CORPUS, False)) == CORPUS


def test_byte_level_metadata_matches_the_model_dir(preset: tuple[str, Path], tmp_path: Path) -> None:
    name, model_dir = preset
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = byte_level_vocab(spec, config, PRESETS[name].config["vocab_size"]) | {"pre": "gpt-2"}
    tokenizer = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "vocab.gguf", "llama", vocab))
    from_dir = Tokenizer.from_dir(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Größe? 🙂"}]
    assert tokenizer.apply_chat_template(messages) == from_dir.apply_chat_template(messages)
    assert tokenizer.apply_chat_template(messages, tokenize=True) == from_dir.apply_chat_template(
        messages, tokenize=True
    )
    assert tokenizer.bos_token == (config["bos_token"] or config["pad_token"])
    # The file names tokenizer_config.json's EOS (the end of a turn), as llama.cpp's converter
    # writes it; the end-of-text token joins it by its text.
    assert tokenizer.eos_token_id == vocab["eos"]
    assert sorted(tokenizer.eos_token_ids) == sorted(from_dir.eos_token_ids)
    assert tokenizer.vocab_size == PRESETS[name].config["vocab_size"]


def test_unknown_names_are_clear_errors(tmp_path: Path) -> None:
    vocab = {"model": "gpt2", "pre": "mystery-bpe", "tokens": ["a", "b", "ab"], "types": [1, 1, 1]}
    vocab |= {"merges": ["a b"], "bos": 0, "eos": 1, "add_bos": False}
    with pytest.raises(InvalidModelError, match=r"vocab\.gguf.*tokenizer\.ggml\.pre.*mystery-bpe"):
        Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "vocab.gguf", "llama", vocab))
    vocab |= {"model": "bert"}
    with pytest.raises(InvalidModelError, match=r"tokenizer\.ggml\.model.*bert"):
        Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "vocab.gguf", "llama", vocab))


SPM_SPECIALS = ["<unk>", "<s>", "</s>"]
SPM_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def sentencepiece_vocab() -> tuple[list[str], list[float]]:
    """A SentencePiece-style vocabulary trained on the corpus: the special pieces, the 256 byte
    pieces, the merged pieces scored by when they were learned, then the characters."""
    trained = SentencePieceBPETokenizer(add_prefix_space=True)
    trained.train_from_iterator(CORPUS.splitlines(), vocab_size=600, special_tokens=SPM_SPECIALS, show_progress=False)
    by_id = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    pieces = [p for p, _ in by_id if p not in SPM_SPECIALS]
    merged = [p for p in pieces if len(p) > 1]
    chars = [p for p in pieces if len(p) == 1]
    tokens = SPM_SPECIALS + SPM_BYTES + merged + chars
    scores = [0.0] * (len(SPM_SPECIALS) + len(SPM_BYTES)) + [-float(i) for i in range(len(merged) + len(chars))]
    return tokens, scores


def converted_reference(tokens: list[str], scores: list[float]) -> ReferenceTokenizer:
    """The tokenizer transformers' converter makes of a SentencePiece vocabulary: merges for
    every split of a piece into two pieces, ranked by the piece's score; `▁` before the text."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(score, left, right) for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    merges.sort(key=lambda m: m[0], reverse=True)
    model = BPE(
        vocab, [(left, right) for _, left, right in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True
    )
    reference = ReferenceTokenizer(model)
    reference.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    reference.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    reference.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    reference.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPM_SPECIALS])
    return reference


def spm_types(tokens: list[str]) -> list[TokenType]:
    kinds = {"<unk>": TokenType.UNKNOWN, "<s>": TokenType.CONTROL, "</s>": TokenType.CONTROL}
    return [kinds.get(t, TokenType.BYTE if t in SPM_BYTES else TokenType.NORMAL) for t in tokens]


def test_sentencepiece_vocabulary_matches_the_converted_reference(tmp_path: Path) -> None:
    tokens, scores = sentencepiece_vocab()
    reference = converted_reference(tokens, scores)
    vocab = {"model": "llama", "tokens": tokens, "types": spm_types(tokens), "scores": scores}
    vocab |= {"bos": 1, "eos": 2, "unk": 0, "add_bos": True}
    tokenizer = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "spm.gguf", "llama", vocab))
    for text in [*TEXTS, "<s>[INST] hi</s> there<unk>", "\u00e9\u0301 \u2603 \U0001f642"]:
        for add_special_tokens in (True, False):
            expected = reference.encode(text, add_special_tokens=add_special_tokens).ids
            assert tokenizer.encode(text, add_special_tokens) == expected, text
        ids = reference.encode(text, add_special_tokens=False).ids
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip)
    snowman = tokenizer.encode("\u2603", False)
    assert "\u2603" not in CORPUS
    assert [tokens[i] for i in snowman] == ["▁", "<0xE2>", "<0x98>", "<0x83>"]
    assert tokenizer.eos_token_ids == [2]
    # Streaming keeps the spaces that the decoder strips from the front of a window.
    stream = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode(f"{TEXTS[2]} \u2603 {CORPUS[:300]}", False)
    assert "".join([stream.push(i) for i in ids]) + stream.finish() == tokenizer.decode(ids)


def test_sentencepiece_model_matches_sentencepiece(tmp_path: Path) -> None:
    """A real SentencePiece BPE model (identity normalization and byte fallback, as Llama 2's)
    stored as llama.cpp's converter stores it encodes as sentencepiece itself does."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_prefix=str(tmp_path / "spm"),
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = TokenType.NORMAL
        if sp.is_unknown(i):
            kind = TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = TokenType.CONTROL
        elif sp.is_byte(i):
            kind = TokenType.BYTE
        types.append(kind)
    vocab = {"model": "llama", "tokens": tokens, "types": types, "scores": scores}
    vocab |= {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "add_bos": True}
    tokenizer = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "spm.gguf", "llama", vocab))
    for text in TEXTS:
        expected = sp.encode(text)
        assert tokenizer.encode(text, False) == expected, text
        assert tokenizer.encode(text, True) == [sp.bos_id(), *expected]
        assert tokenizer.decode(expected) == sp.decode(expected)
