"""The terminal chat (`--chat-tui`) against the API over a fake node."""

from __future__ import annotations

import io

from rich.console import Console

from exo.viz.chat_tui import ChatTUI, ReplyStats, parse_command, stats_line
from support.app_harness import REPLY, Served


def scripted(lines: list[str | None]):
    pending = list(lines)

    async def read_line(prompt: str) -> str | None:
        return pending.pop(0) if pending else None

    return read_line


async def test_chat_streams_and_reports_speed(served: Served) -> None:
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    tui = ChatTUI(served.url, console=console, read_line=scripted(["Hello", "", "Again", "/exit"]))
    await tui.run()
    text = console.export_text()
    assert text.count(REPLY) == 2
    assert text.count("tokens/s") == 2 and text.count("time to first token") == 2
    assert f"{len(served.node.reply) - 1} tokens" in text
    assert [m["role"] for m in tui.messages] == ["user", "assistant", "user", "assistant"]
    second_prompt = served.node.calls[1]["prompt"]
    assert "Hello" in second_prompt and REPLY in second_prompt and "Again" in second_prompt


async def test_chat_clear_and_errors(served: Served) -> None:
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    tui = ChatTUI(served.url, model="no-such-model", console=console, read_line=scripted(["Hi", None]))
    await tui.run()
    text = console.export_text()
    assert "error:" in text and "no-such-model" in text
    assert tui.messages == []
    tui = ChatTUI(served.url, console=console, read_line=scripted(["Hi", "/clear", None]))
    await tui.run()
    assert tui.messages == []
    assert "conversation cleared" in console.export_text()


def test_commands_are_words_with_or_without_a_slash() -> None:
    assert parse_command("exit") == parse_command("QUIT") == parse_command("/exit") == ("exit", "")
    assert parse_command("  quit  ") == parse_command("/bye") == ("exit", "")
    assert parse_command("models") == parse_command("/Models") == ("models", "")
    assert parse_command("model llama-3.2-1b") == parse_command("/model llama-3.2-1b") == ("model", "llama-3.2-1b")
    assert parse_command("model") == ("model", "")
    assert parse_command("clear") == ("clear", "") and parse_command("help") == ("help", "")
    # Anything else is a message to the model, even when it starts with a command's word.
    for message in ("exit the loop early?", "quit smoking tips", "model this for me", "help me", "bye", "", "Hi"):
        assert parse_command(message) is None, message


def stats(**overrides: object) -> ReplyStats:
    fields: dict = dict(
        text="", completion_tokens=12, seconds_to_first_token=0.25, tokens_per_second=40.0, finish_reason="stop"
    )
    return ReplyStats(**{**fields, **overrides})


def test_the_statistics_line() -> None:
    assert stats_line(stats(cluster_tflops=11.5)) == (
        "12 tokens | 40.0 tokens/s | time to first token 0.25s | cluster ~11.50 TFLOPS (fp16, estimated)"
    )
    assert stats_line(stats(finish_reason="length")) == (
        "12 tokens | 40.0 tokens/s | time to first token 0.25s (token limit)"
    )


async def test_exit_without_a_slash_and_the_framed_header(served: Served, model_dir) -> None:
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    lines = ["Hello", "Exit", "never sent"]
    tui = ChatTUI(served.url, model=str(model_dir), console=console, read_line=scripted(lines))
    await tui.run()
    text = console.export_text()
    top = text.splitlines()[0]
    assert top.startswith("╭") and "exo terminal chat" in top, text
    assert f"│ Model: {model_dir}" in text
    for command in ("exit, quit", "models", "model NAME", "clear", "help"):
        assert f"│ {command} " in text, command
    assert [call["prompt"] for call in served.node.calls if "never sent" in call["prompt"]] == []
    assert len(served.node.calls) == 1 and text.rstrip().endswith("bye")


async def test_statistics_after_each_answer(served: Served) -> None:
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    tui = ChatTUI(served.url, console=console, read_line=scripted(["Hello", "quit"]))
    await tui.run()
    text = console.export_text()
    tokens = len(served.node.reply) - 1
    assert f"{tokens} tokens | " in text and " tokens/s | time to first token " in text
    # The fake node reports 2 fp16 TFLOPS: the cluster's estimate.
    assert "cluster ~2.00 TFLOPS (fp16, estimated)" in text


async def test_models_lists_what_the_node_runs_and_model_switches(served: Served, model_dir) -> None:
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    lines = ["models", "model no-such-model", "Hi", "model", f"model {model_dir}", "Hi", "exit"]
    tui = ChatTUI(served.url, model=str(model_dir), console=console, read_line=scripted(lines))
    await tui.run()
    text = console.export_text()
    assert "Models this node can run" in text
    listing = text[text.index("Models this node can run") : text.index("Model: no-such-model")]
    assert f"{model_dir} (current)" in listing
    assert "llama-3.2-1b " in listing  # a registry model the candle engine runs
    assert "error:" in text and "no-such-model" in text  # the switch took: that request named the model
    assert "Model: no-such-model\n" in text  # `model` alone shows the current one
    assert [str(call["shard"].model_id) for call in served.node.calls] == [str(model_dir)]
    assert [m["role"] for m in tui.messages] == ["user", "assistant"]
