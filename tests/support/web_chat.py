"""The web chat in headless Chromium (the OS's) over a real API server."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from playwright.async_api import Page, async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextlib.asynccontextmanager
async def browser_page(**options: Any) -> AsyncIterator[Page]:
    """A new page (Playwright's `new_page` `options`) in headless Chromium, closed after."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield await browser.new_page(**options)
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def web_chat_page(node: Any, model_dir: Path) -> AsyncIterator[Page]:
    """A page open on the web chat of an API over `node` (candle, default model `model_dir`);
    the browser and the API stop after."""
    from exo.api import ChatGPTAPI
    from exo.helpers import find_available_port

    api = ChatGPTAPI(node, "CandleInferenceEngine", default_model=str(model_dir))
    port = find_available_port("127.0.0.1")
    await api.run(host="127.0.0.1", port=port)
    try:
        async with browser_page(viewport={"width": 1280, "height": 800}) as page:
            await page.goto(f"http://127.0.0.1:{port}/")
            yield page
    finally:
        await api.stop()
