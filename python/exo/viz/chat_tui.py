"""A terminal chat (`--chat-tui`), as xotorch's users know it: a framed header, answers streamed token by token
from the node's API, and after each answer its tokens, tokens/s, time to first token and the cluster's estimated
TFLOPS.

Commands, with or without a leading slash and in any case: `exit` or `quit` (or Ctrl-D) leaves, `models` lists the
models the node can run, `model NAME` switches to another, `clear` starts the conversation over, `help` repeats them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from rich.columns import Columns
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

EXIT_COMMANDS = ("exit", "quit", "/exit", "/quit", "/bye")
COMMANDS = (
    ("exit, quit", "leave (Ctrl-D too)"),
    ("models", "list the models this node can run"),
    ("model NAME", "chat with another model"),
    ("clear", "start the conversation over"),
    ("help", "show these commands"),
)


@dataclass
class ReplyStats:
    """How one answer went."""

    text: str
    completion_tokens: int
    seconds_to_first_token: float
    tokens_per_second: float
    finish_reason: str | None
    #: The estimated fp16 TFLOPS of the cluster's nodes, as they report them; None when the node does not say.
    cluster_tflops: float | None = None


class ChatError(Exception):
    """The API answered with an error."""


async def _read_line(prompt: str) -> str | None:
    """One line typed at the terminal, read off the event loop; None at end of input."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, input, prompt)
    except EOFError:
        return None


def parse_command(line: str) -> tuple[str, str] | None:
    """The command a line gives and its argument (`("model", "llama-3.2-1b")`); None for a message to the model.
    A command is its word alone (`model` also with a name after it), with or without a leading `/`."""
    words = line.strip().split(maxsplit=1)
    if not words:
        return None
    argument = words[1].strip() if len(words) > 1 else ""
    if words[0].lower() in EXIT_COMMANDS and not argument:
        return "exit", ""
    word = words[0].lower().removeprefix("/")
    if word in ("models", "clear", "help") and not argument:
        return word, ""
    if word == "model" and " " not in argument:
        return "model", argument
    return None


def stats_line(stats: ReplyStats) -> str:
    """The statistics printed under an answer."""
    parts = [
        f"{stats.completion_tokens} tokens",
        f"{stats.tokens_per_second:.1f} tokens/s",
        f"time to first token {stats.seconds_to_first_token:.2f}s",
    ]
    if stats.cluster_tflops is not None:
        parts.append(f"cluster ~{stats.cluster_tflops:.2f} TFLOPS (fp16, estimated)")
    ending = " (token limit)" if stats.finish_reason == "length" else ""
    return " | ".join(parts) + ending


class ChatTUI:
    """Chats with the cluster through the ChatGPT-compatible API at `api_url` (e.g. `http://127.0.0.1:52415`)."""

    def __init__(
        self,
        api_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        console: Console | None = None,
        read_line: Callable[[str], Awaitable[str | None]] = _read_line,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.console = console or Console()
        self.read_line = read_line
        self.messages: list[dict[str, str]] = []

    def header(self) -> Panel:
        """The framed header: what to do, the commands, the model and the API."""
        commands = Table.grid(padding=(0, 2))
        for name, what in COMMANDS:
            commands.add_row(f"[bold]{name}[/]", what)
        body = Table.grid()
        body.add_row("Type a message and press Enter; the answer streams in, then its statistics.")
        body.add_row("")
        body.add_row(commands)
        body.add_row("")
        body.add_row(f"Model: [bold cyan]{self.model or 'the node default'}[/]   API: {self.api_url}/v1")
        return Panel(body, title="[bold yellow]exo terminal chat[/]", border_style="yellow", expand=False)

    async def run(self) -> None:
        """Reads messages and commands until `exit` or end of input."""
        self.console.print(self.header())
        async with aiohttp.ClientSession(headers=self.headers) as session:
            while True:
                line = await self.read_line("you> ")
                if line is None:
                    self.console.print("[dim]bye[/]")
                    return
                command = parse_command(line)
                if command is None:
                    if line.strip():
                        await self._turn(session, line.strip())
                    continue
                name, argument = command
                if name == "exit":
                    self.console.print("[dim]bye[/]")
                    return
                await self._command(session, name, argument)

    async def _command(self, session: aiohttp.ClientSession, name: str, argument: str) -> None:
        if name == "clear":
            self.messages.clear()
            self.console.print("[dim]conversation cleared[/]")
        elif name == "help":
            self.console.print(self.header())
        elif name == "models":
            await self._list_models(session)
        elif name == "model" and not argument:
            self.console.print(f"Model: [bold cyan]{self.model or 'the node default'}[/]")
        elif name == "model":
            self.model = argument
            self.console.print(f"Model: [bold cyan]{argument}[/] [dim](the conversation goes on with it)[/]")

    async def _list_models(self, session: aiohttp.ClientSession) -> None:
        try:
            models = await self.models(session)
        except (ChatError, aiohttp.ClientError) as e:
            self.console.print(f"[bold red]error:[/] {e}")
            return
        self.console.print("[bold]Models this node can run[/]")
        ids = [f"[bold cyan]{m['id']} (current)[/]" if m["id"] == self.model else m["id"] for m in models]
        self.console.print(Columns(ids, padding=(0, 3)))
        self.console.print("[dim]`model NAME` switches; a Hugging Face repo id or a local model directory work too.[/]")

    async def models(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """The models the node's API lists (`GET /v1/models`)."""
        async with session.get(f"{self.api_url}/v1/models") as response:
            if response.status != 200:
                raise ChatError(await _error_message(response))
            body = await response.json(content_type=None)
        return [m for m in body.get("data", []) if isinstance(m, dict) and "id" in m]

    async def cluster_tflops(self, session: aiohttp.ClientSession) -> float | None:
        """The fp16 TFLOPS the cluster's nodes report in `/v1/topology`, summed; None when it cannot be read."""
        try:
            async with session.get(f"{self.api_url}/v1/topology") as response:
                if response.status != 200:
                    return None
                body = await response.json(content_type=None)
            nodes = body.get("nodes") or {}
            return float(sum(float(node["flops"]["fp16"]) for node in nodes.values())) if nodes else None
        except (aiohttp.ClientError, ValueError, KeyError, TypeError, AttributeError):
            return None

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
        stats.cluster_tflops = await self.cluster_tflops(session)
        self.console.print(f"\n[dim]{stats_line(stats)}[/]")

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
