"""The web chat page in headless Chromium (the OS's package, driven by Playwright): send, stream, persist, and the
Image button for vision models only."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Dialog

from exo.inference.tokenizers import Tokenizer, resolve_tokenizer
from exo.testing.synth_llava import synthetic_image
from support.app_harness import REPLY, Served, reply_tokens, serve
from support.fake_node import FakeNode
from support.web_chat import browser_page, web_chat_page


async def test_send_a_message_and_see_it_stream(served: Served, tmp_path: Path) -> None:
    served.node.delay = 0.03
    async with browser_page(viewport={"width": 1280, "height": 800}) as page:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(served.url + "/")
        await page.wait_for_function("document.querySelectorAll('#model-select option').length > 0")
        assert await page.input_value("#model-select") == served.api.default_model
        await page.wait_for_selector("text=Fake Device")
        # Record every length the answer goes through, to see it grow token by token.
        await page.evaluate(
            """() => {
              window.seenLengths = [];
              new MutationObserver(() => {
                const body = document.querySelector('.message.assistant .body');
                if (body) window.seenLengths.push(body.textContent.length);
              }).observe(document.getElementById('messages'),
                         {subtree: true, childList: true, characterData: true});
            }"""
        )
        await page.fill("#prompt", "Hello cluster")
        await page.keyboard.press("Enter")
        await page.wait_for_selector(".message.user >> text=Hello cluster")
        await page.wait_for_selector(".message.assistant.streaming")
        await page.wait_for_selector(".message.assistant:not(.streaming)")
        answer = await page.text_content(".message.assistant .body")
        assert answer == REPLY
        lengths = sorted(set(await page.evaluate("window.seenLengths")))
        assert len(lengths) > 5 and lengths[-1] == len(REPLY.encode("utf-16-le")) // 2  # JS counts UTF-16 units
        assert "tokens/s" in (await page.text_content(".message.assistant .meta"))
        await page.screenshot(path=str(tmp_path / "web-chat.png"), full_page=True)
        assert (tmp_path / "web-chat.png").stat().st_size > 10_000

        await page.reload()
        await page.wait_for_selector(".message.assistant")
        assert await page.text_content(".message.assistant .body") == REPLY
        await page.click("#new-chat")
        assert await page.locator(".message").count() == 0
        assert errors == []
    assert served.node.calls[0]["prompt"].count("Hello cluster") == 1


async def test_server_errors_are_shown(served: Served) -> None:
    served.node.fail_after = 0
    async with browser_page() as page:
        await page.goto(served.url + "/")
        await page.wait_for_function("document.querySelectorAll('#model-select option').length > 0")
        await page.fill("#prompt", "Hi")
        await page.keyboard.press("Enter")
        await page.wait_for_selector("#error:not([hidden])")
        assert "went away" in await page.text_content("#error")


async def test_the_image_button_is_hidden_for_a_text_model(served: Served) -> None:
    async with browser_page() as page:
        await page.goto(served.url + "/")
        await page.wait_for_function("document.querySelectorAll('#model-select option').length > 0")
        assert await page.is_hidden("#attach")


async def test_the_image_button_shows_for_a_vision_model_only(llava_dir: Path, tmp_path: Path) -> None:
    """Shown for LLaVA; hidden, and the attached image dropped, on switching to a text model; shown again after."""
    picture = tmp_path / "picture.png"
    synthetic_image().save(picture)
    tokenizer = await resolve_tokenizer(llava_dir)
    async for s in serve(FakeNode(reply_tokens(tokenizer)), llava_dir, tokenizer):
        async with browser_page() as page:
            await page.goto(s.url + "/")
            await page.wait_for_selector("#attach", state="visible")
            await page.set_input_files("#image-file", str(picture))
            await page.wait_for_selector("#attachment:not([hidden])")
            await page.select_option("#model-select", "llama-3.2-1b")
            assert await page.is_hidden("#attach")
            assert await page.is_hidden("#attachment")
            await page.select_option("#model-select", str(llava_dir))
            assert await page.is_visible("#attach")
            assert await page.is_hidden("#attachment")


async def test_a_node_with_an_api_key_asks_for_it_once(model_dir: Path, tokenizer: Tokenizer) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    asked: list[str] = []

    async def answer(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept("sk-cluster")

    async for s in serve(node, model_dir, tokenizer, api_key="sk-cluster"):
        async with browser_page() as page:
            page.on("dialog", answer)
            await page.goto(s.url + "/")
            await page.wait_for_function("document.querySelectorAll('#model-select option').length > 0")
            await page.fill("#prompt", "Hi")
            await page.keyboard.press("Enter")
            await page.wait_for_selector(".message.assistant .meta:not(:empty)")
            assert await page.text_content(".message.assistant .body") == REPLY
            # Asked once, although the page's first requests all met a 401; kept across a reload.
            assert len(asked) == 1 and "API key" in asked[0]
            await page.reload()
            await page.wait_for_function("document.querySelectorAll('#model-select option').length > 0")
            assert len(asked) == 1
    assert len(node.calls) == 1


async def test_web_chat_on_a_real_two_node_ring(model_dir: Path, tmp_path: Path) -> None:
    """The page over real nodes (candle, gRPC over loopback), sampling at temperature 1 for varied text."""
    from exo.inference.candle import CandleInferenceEngine
    from support.cluster import running_cluster

    async with running_cluster(["a", "b"], CandleInferenceEngine, default_sample_temperature=1.0) as nodes:
        async with web_chat_page(nodes[0], model_dir) as page:
            await page.wait_for_function("document.getElementById('node-count').textContent === '2'")
            await page.fill("#prompt", "Hello ring")
            await page.keyboard.press("Enter")
            await page.wait_for_selector(".message.assistant .meta:not(:empty)", timeout=120_000)
            answer = await page.text_content(".message.assistant .body")
            meta = await page.text_content(".message.assistant .meta")
            await page.screenshot(path=str(tmp_path / "web-chat-ring.png"), full_page=True)
        assert answer and answer.strip()
        assert "tokens/s" in meta
        assert all(not n.outstanding_requests for n in nodes)
