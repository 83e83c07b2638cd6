"""Turning a node's generation (an async iterator of token ids) into the text of one chat completion: a timeout
per token, detokenizing, stop sequences, the token limit, and how the generation ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from exo.api.chat_request import ChatRequest
from exo.api.text_stream import StopScanner, TokenText, eos_token_ids


@dataclass
class Outcome:
    """How a generation ended."""

    completion_tokens: int
    finish_reason: str
    # Whether the node has finished the request too (its end, EOS or the token limit), so nothing is to cancel.
    node_done: bool


class GenerationTimeout(Exception):
    """No token arrived within the response timeout."""


async def next_token(generation: AsyncIterator[int], timeout: float) -> int:
    """The next token, or `GenerationTimeout` after `timeout` seconds.

    Unlike `asyncio.wait_for` before Python 3.12, this never swallows a cancellation of the caller.
    """
    step = asyncio.ensure_future(generation.__anext__())
    try:
        done, _ = await asyncio.wait({step}, timeout=timeout)
    except asyncio.CancelledError:
        step.cancel()
        await asyncio.wait({step}, timeout=1.0)  # let the step unwind before the generation is closed
        raise
    if not done:
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
        raise GenerationTimeout
    return step.result()


async def generate_text(
    generation: AsyncIterator[int],
    tokenizer: Any,
    chat: ChatRequest,
    limit: int | None,
    timeout_for_next: Callable[[], float],
    on_text: Callable[[str], Awaitable[None]],
) -> Outcome:
    """Runs `generation` to its end, a stop sequence or `limit` tokens, passing text pieces to `on_text`."""
    detokenizer = TokenText(tokenizer)
    stops = StopScanner(chat.stop)
    eos = eos_token_ids(tokenizer)
    count = 0
    finish: str | None = None
    node_done = True
    while finish is None:
        try:
            token = int(await next_token(generation, timeout_for_next()))
        except StopAsyncIteration:
            break
        if token in eos:
            finish = "stop"
            break
        count += 1
        text, stopped = stops.feed(detokenizer.push(token))
        if text:
            await on_text(text)
        if stopped:
            finish = "stop"
            node_done = False
        elif limit is not None and count >= limit:
            finish = "length"
    if not stops.stopped:
        text, stopped = stops.feed(detokenizer.finish())
        text += stops.flush()
        if text:
            await on_text(text)
        if stopped:
            finish = "stop"
    if finish is None:
        # The node ends a request short of EOS only at a limit: the tokens asked for, its
        # `max_generate_tokens`, or the model's context.
        finish = "length"
    return Outcome(count, finish, node_done)
