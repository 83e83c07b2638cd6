"""The terminal chat (`--chat-tui`) against the API over a fake node."""

from __future__ import annotations

import io

from rich.console import Console

from exo.viz.chat_tui import ChatTUI
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
    assert text.count("tokens/s") == 2
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
