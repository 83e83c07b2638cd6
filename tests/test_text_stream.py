"""Streaming text from tokens: UTF-8 safe pieces and stop sequences that span pieces."""

from __future__ import annotations

from exo.api.text_stream import StopScanner, TokenText, count_tokens, eos_token_ids
from exo.inference.tokenizers import DummyTokenizer, Tokenizer


def test_pieces_rebuild_the_text_and_never_split_characters(tokenizer: Tokenizer) -> None:
    text = "Größe 日本語 🙂🚀 café"
    stream = TokenText(tokenizer)
    pieces = [stream.push(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_other_tokenizers_stream_by_suffix() -> None:
    stream = TokenText(DummyTokenizer())
    assert [stream.push(1), stream.push(2)] == ["dummy", "dummy"]
    assert stream.finish() == ""


def test_stop_sequences_across_pieces() -> None:
    scanner = StopScanner(["STOP", "halt"])
    out = []
    for piece in ["Hello wor", "ld ST", "O", "P and more"]:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello world "
    assert scanner.stopped and scanner.flush() == ""


def test_held_back_text_is_flushed_without_a_stop() -> None:
    scanner = StopScanner(["<end>"])
    text, stopped = scanner.feed("almost <en")
    assert not stopped and text == "almost"
    assert scanner.flush() == " <en"
    assert StopScanner([]).feed("anything") == ("anything", False)


def test_counts_and_eos(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert count_tokens(tokenizer, prompt) == len(
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    )
    assert tokenizer.eos_token_id in eos_token_ids(tokenizer)
    assert eos_token_ids(DummyTokenizer()) == {69}
