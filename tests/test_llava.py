"""LLaVA-1.5 on the candle engine, held to transformers' `LlavaForConditionalGeneration` and `LlavaProcessor` on
the tiny synthetic preset and a fixed synthetic picture (`scripts/record_llava_golden.py` recorded the values).

Checked here: the pixel values of our preprocessing against `CLIPImageProcessor`'s, the prompt ids against the
processor's (its chat template, the expanded image token, BOS), f32 logits within 1e-4 at the last three prompt
positions and 40 greedy tokens whole and split over 2 and 3 shards (the pixel values reach only the first shard),
and the API, the CLI and the web chat with images: answers, and clear 400s for bad images.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from exo import errors
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer, resolve_tokenizer
from exo.inference.vision import ImageProcessor, vision_messages
from exo.testing.synth import write_model
from exo.testing.synth_llava import synthetic_image

GOLDEN = json.loads((Path(__file__).parent / "golden" / "llava" / "tiny-llava.json").read_text())
F32_TOLERANCE = 1e-4
LAYERS = 4


@pytest.fixture(scope="module")
def pixels(llava_dir: Path) -> np.ndarray:
    processor = ImageProcessor.from_model_dir(llava_dir)
    assert processor is not None
    return processor.pixel_values([synthetic_image()])


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _question() -> str:
    return next(p["text"] for p in GOLDEN["messages"][0]["content"] if p["type"] == "text")


def _chat(image_url: str, **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": _question()}, {"type": "image_url", "image_url": {"url": image_url}}]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def _splits(parts: int) -> list[tuple[int, int]]:
    bounds = np.array_split(np.arange(LAYERS), parts)
    return [(int(b[0]), int(b[-1])) for b in bounds]


def test_preprocessing_gives_clip_image_processors_pixel_values(pixels: np.ndarray) -> None:
    assert list(pixels.shape) == GOLDEN["pixel_shape"] and pixels.dtype == np.float32
    flat = pixels.reshape(-1)
    np.testing.assert_allclose(flat[:: GOLDEN["pixel_stride"]], GOLDEN["pixel_sample"], atol=1e-6, rtol=0)
    assert abs(float(flat.astype(np.float64).sum()) - GOLDEN["pixel_sum"]) < 1e-3


async def test_the_prompt_is_llava_processors(llava_dir: Path) -> None:
    tokenizer = await resolve_tokenizer(llava_dir)
    processor = ImageProcessor.from_model_dir(llava_dir)
    assert processor is not None and processor.tokens_per_image == 64
    messages = vision_messages([{"role": "user", "content": _question()}], [["an image"]])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == GOLDEN["prompt"]
    ids = tokenizer.encode(processor.expand_prompt(prompt, tokenizer.bos_token), add_special_tokens=False)
    assert ids == GOLDEN["prompt_ids"]


class Ring:
    """One engine per shard, run in order like the node's ring; the prompt's images go to the first."""

    def __init__(self, model_dir: Path, parts: int) -> None:
        self.stages = [
            (CandleInferenceEngine(), Shard(str(model_dir), start, end, LAYERS)) for start, end in _splits(parts)
        ]

    async def step(self, tokens: list[int], images: np.ndarray | None = None) -> np.ndarray:
        x: np.ndarray = np.array([tokens], dtype=np.int64)
        state: dict[str, Any] | None = None if images is None else {"pixel_values": images}
        for engine, shard in self.stages:
            x, state = await engine.infer_tensor("r", shard, x, state)
            assert state is None or "pixel_values" not in state, "the images went past the first shard"
        return x.reshape(-1)


@pytest.mark.parametrize("parts", [1, 2, 3])
async def test_logits_and_greedy_tokens_match_transformers(llava_dir: Path, pixels: np.ndarray, parts: int) -> None:
    ids = GOLDEN["prompt_ids"]
    ring = Ring(llava_dir, parts)
    logits = [await ring.step(ids[:-2], pixels), await ring.step([ids[-2]]), await ring.step([ids[-1]])]
    for got, expected in zip(logits, GOLDEN["logits_last3"], strict=True):
        np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), atol=F32_TOLERANCE, rtol=0)
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(len(GOLDEN["greedy_tokens"]) - 1):
        tokens.append(int(np.argmax(await ring.step([tokens[-1]]))))
    assert tokens == GOLDEN["greedy_tokens"]


async def test_checkpoints_laid_out_as_transformers_5_names_them_give_the_same_logits(
    llava_dir: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file, save_file

    # transformers 5's module names (the tower without `vision_model`, the decoder under `model.language_model`).
    renames = [
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
    ]

    def renamed(name: str) -> str:
        for old, new in renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    newer = tmp_path / "newer"
    shutil.copytree(llava_dir, newer)
    tensors = {renamed(name): value for name, value in load_file(llava_dir / "model.safetensors").items()}
    assert "model.language_model.layers.0.mlp.up_proj.weight" in tensors and "lm_head.weight" in tensors
    save_file(tensors, newer / "model.safetensors")
    ids = GOLDEN["prompt_ids"]
    hub, saved = await Ring(llava_dir, 2).step(ids, pixels), await Ring(newer, 2).step(ids, pixels)
    assert np.array_equal(hub, saved)


async def test_the_engine_refuses_images_it_cannot_place(llava_dir: Path, pixels: np.ndarray, tmp_path: Path) -> None:
    engine = CandleInferenceEngine()
    shard = Shard(str(llava_dir), 0, LAYERS - 1, LAYERS)
    text_only = np.array([GOLDEN["prompt_ids"][:5]], dtype=np.int64)
    with pytest.raises(errors.InvalidArgumentError, match="0 image tokens but its images give 64 features"):
        await engine.infer_tensor("a", shard, text_only, {"pixel_values": pixels})
    with pytest.raises(errors.InvalidArgumentError, match=r"images must be \[n, 3, 112, 112\]"):
        await engine.infer_tensor("b", shard, np.array([GOLDEN["prompt_ids"]]), {"pixel_values": pixels[:, :, :50]})
    # Text alone runs as a Llama would.
    logits, _ = await engine.infer_tensor("c", shard, text_only)
    assert np.isfinite(logits).all()
    llama = write_model("tiny-llama", tmp_path / "llama")
    with pytest.raises(errors.InvalidArgumentError, match="does not take images"):
        await CandleInferenceEngine().infer_tensor(
            "d", Shard(str(llama), 0, 3, 4), np.array([[1, 2, 3]]), {"pixel_values": pixels}
        )


def _greedy_text(tokenizer: Any, limit: int) -> str:
    """The golden greedy tokens as the API answers them: up to the first end-of-sequence token, at most `limit`."""
    tokens = list(itertools.takewhile(lambda t: t not in tokenizer.eos_token_ids, GOLDEN["greedy_tokens"][:limit]))
    return tokenizer.decode(tokens)


async def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("nodes", [1, 2])
async def test_the_api_answers_about_an_image_as_transformers_does(llava_dir: Path, nodes: int) -> None:
    from exo.api import ChatGPTAPI
    from exo.helpers import find_available_port
    from support.cluster import running_cluster

    tokenizer = await resolve_tokenizer(llava_dir)
    image_url = _data_url(_png(synthetic_image()))
    async with running_cluster(["a", "b"][:nodes], CandleInferenceEngine) as ring:
        api = ChatGPTAPI(ring[0], "CandleInferenceEngine", default_model=str(llava_dir))
        port = find_available_port("127.0.0.1")
        await api.run(host="127.0.0.1", port=port)
        url = f"http://127.0.0.1:{port}/v1/chat"
        try:
            status, encoded = await _post(f"{url}/token/encode", _chat(image_url))
            assert status == 200, encoded
            ids = tokenizer.encode(encoded["encoded_prompt"], add_special_tokens=False)
            assert ids == GOLDEN["prompt_ids"]
            status, body = await _post(f"{url}/completions", _chat(image_url, max_tokens=12))
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == _greedy_text(tokenizer, 12)
            assert body["usage"]["prompt_tokens"] == len(GOLDEN["prompt_ids"])
        finally:
            await api.stop()
        assert all(not n.outstanding_requests for n in ring)


async def test_bad_images_are_400s_that_say_what_was_wrong(llava_dir: Path, tmp_path: Path) -> None:
    from exo.api import ChatGPTAPI
    from exo.helpers import find_available_port
    from support.cluster import running_cluster

    llama = write_model("tiny-llama", tmp_path / "llama")
    picture = tmp_path / "picture.png"
    picture.write_bytes(_png(synthetic_image()))
    async with running_cluster(["a"], CandleInferenceEngine) as ring:
        api = ChatGPTAPI(ring[0], "CandleInferenceEngine", default_model=str(llava_dir))
        port = find_available_port("127.0.0.1")
        await api.run(host="127.0.0.1", port=port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        cases = [
            (_chat("data:image/png;base64,not base64!"), "invalid_image", "base64"),
            (_chat(_data_url(b"no picture in here")), "invalid_image", "not a readable image"),
            (_chat(str(picture)), "invalid_image", "neither reads files nor fetches URLs"),
            (_chat("https://example.com/cat.png"), "invalid_image", "data URLs"),
            ({**_chat(_data_url(picture.read_bytes())), "model": str(llama)}, "unsupported_content", str(llama)),
        ]
        try:
            for body, code, words in cases:
                status, answer = await _post(url, body)
                assert (status, answer["error"]["code"]) == (400, code), answer
                assert words in answer["error"]["message"], answer
            status, answer = await _post(url, _chat(_data_url(picture.read_bytes()), max_tokens=3))
            assert status == 200, answer
        finally:
            await api.stop()


def test_run_answers_about_an_image_file(llava_dir: Path, tmp_path: Path) -> None:
    from test_cli_run import exo_main

    picture = tmp_path / "picture.png"
    picture.write_bytes(_png(synthetic_image()))
    args = ["run", str(llava_dir), "--prompt", _question(), "--image", str(picture), "--max-generate-tokens", "8"]
    done = exo_main(*args)
    out, _ = done.communicate(timeout=180)
    assert done.returncode == 0, out
    assert _greedy_text(Tokenizer.from_dir(llava_dir), 8) in out, out
    missing = exo_main("run", str(llava_dir), "--image", str(tmp_path / "none.png"))
    out, _ = missing.communicate(timeout=180)
    assert missing.returncode == 2 and "cannot read the image file" in out, out


async def test_the_web_chat_sends_an_attached_image(llava_dir: Path, tmp_path: Path) -> None:
    from support.cluster import running_cluster
    from support.web_chat import web_chat_page

    picture = tmp_path / "picture.png"
    picture.write_bytes(_png(synthetic_image()))
    async with running_cluster(["a"], CandleInferenceEngine, max_generate_tokens=8) as ring:
        async with web_chat_page(ring[0], llava_dir) as page:
            await page.set_input_files("#image-file", str(picture))
            await page.wait_for_selector("#attachment:not([hidden])")
            await page.fill("#prompt", _question())
            await page.keyboard.press("Enter")
            await page.wait_for_selector(".message.assistant .meta:not(:empty)", timeout=120_000)
            assert await page.locator(".message.user img.image").count() == 1
            assert await page.is_hidden("#attachment")
            answer = await page.text_content(".message.assistant .body")
            shown_error = await page.text_content("#error")
            await page.screenshot(path=str(tmp_path / "web-chat-image.png"), full_page=True)
    assert not shown_error
    assert answer == _greedy_text(Tokenizer.from_dir(llava_dir), 8)
