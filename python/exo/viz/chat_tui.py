"""A terminal chat (`--chat-tui`): streams answers from the node's API token by token, then prints tokens/s."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from rich.console import Console

EXIT_COMMANDS = ("/exit", "/quit", "/bye")
HELP = "Type a message and press Enter. /clear starts over, /exit (or Ctrl-D) leaves."


@dataclass
class ReplyStats:
    """How one answer went."""

    text: str
    completion_tokens: int
    seconds_to_first_token: float
    tokens_per_second: float
    finish_reason: str | None


class ChatError(Exception):
    """The API answered with an error."""


async def _read_line(prompt: str) -> str | None:
    """One line typed at the terminal, read off the event loop; None at end of input."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, input, prompt)
    except EOFError:
        return None


class ChatTUI:
    """Chats with the cluster through the ChatGPT-compatible API at `api_url` (e.g. `http://127.0.0.1:52415`)."""

    def __init__(
        self,
        api_url: str,
        model: str | None = None,
        *,
        console: Console | None = None,
        read_line: Callable[[str], Awaitable[str | None]] = _read_line,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.model = model
        self.console = console or Console()
        self.read_line = read_line
        self.messages: list[dict[str, str]] = []

    async def run(self) -> None:
        """Reads messages until `/exit` or end of input."""
        self.console.print(f"[bold yellow]exo chat[/] — {HELP}")
        async with aiohttp.ClientSession() as session:
            while True:
                line = await self.read_line("you> ")
                if line is None or line.strip() in EXIT_COMMANDS:
                    self.console.print("[dim]bye[/]")
                    return
                text = line.strip()
                if not text:
                    continue
                if text == "/clear":
                    self.messages.clear()
                    self.console.print("[dim]conversation cleared[/]")
                    continue
                await self._turn(session, text)

    async def _turn(self, session: aiohttp.ClientSession, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self.console.print("[bold magenta]exo>[/] ", end="")
        try:
            stats = await self.send(session, lambda piece: self.console.print(piece, end="", markup=False))
        except (ChatError, aiohttp.ClientError) as e:
            self.messages.pop()
            self.console.print(f"\n[bold red]error:[/] {e}")
            return
        self.messages.append({"role": "assistant", "content": stats.text})
        ending = " (token limit)" if stats.finish_reason == "length" else ""
        self.console.print(
            f"\n[dim]{stats.completion_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, "
            f"first token after {stats.seconds_to_first_token:.2f}s{ending}[/]"
        )

    async def send(self, session: aiohttp.ClientSession, on_piece: Callable[[str], object]) -> ReplyStats:
        """Streams the answer to the conversation so far, calling `on_piece` with each piece of text."""
        body: dict[str, object] = {
            "messages": self.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        usage_tokens: int | None = None
        finish: str | None = None
        async with session.post(f"{self.api_url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                raise ChatError(await _error_message(response))
            async for event in _sse_events(response):
                if event.get("error"):
                    raise ChatError(event["error"].get("message", "the request failed"))
                if event.get("usage"):
                    usage_tokens = int(event["usage"]["completion_tokens"])
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first = first if first is not None else time.perf_counter()
                        pieces.append(piece)
                        on_piece(piece)
        ended = time.perf_counter()
        tokens = usage_tokens if usage_tokens is not None else len(pieces)
        generating = ended - first if first is not None else 0.0
        return ReplyStats(
            text="".join(pieces),
            completion_tokens=tokens,
            seconds_to_first_token=(first - started) if first is not None else 0.0,
            tokens_per_second=tokens / generating if generating > 0 else 0.0,
            finish_reason=finish,
        )


async def _error_message(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.json(content_type=None)
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
        return f"HTTP {response.status}"


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
