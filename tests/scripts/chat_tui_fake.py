"""Runs the chat TUI against the API over a fake node (the model directory is argv[1]), for the tmux test."""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exo.inference.tokenizers import resolve_tokenizer
from exo.viz.chat_tui import ChatTUI
from support.app_harness import reply_tokens, serve
from support.fake_node import FakeNode


async def main(model_dir: Path) -> None:
    tokenizer = await resolve_tokenizer(model_dir)
    node = FakeNode(reply_tokens(tokenizer), delay=0.02)
    async for served in serve(node, model_dir, tokenizer):
        await ChatTUI(served.url).run()


asyncio.run(main(Path(sys.argv[1])))
