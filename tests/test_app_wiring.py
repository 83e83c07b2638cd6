"""exo.main's callbacks, wired to a fake node: TUI updates, preemptive shard loading, progress broadcasts."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from exo import main as cli
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer
from exo.viz.topology_viz import TopologyViz
from support.app_harness import REPLY, reply_tokens, wait_until
from support.fake_node import FakeNode, FakeRepoProgress


def wired_app(node: FakeNode, tokenizer: Tokenizer) -> cli.App:
    args = cli.build_parser().parse_args(["--inference-engine", "dummy"])
    app = cli.App(args, asyncio.get_running_loop())
    app.node = node
    app.engine_classname = "CandleInferenceEngine"
    app.shard_downloader = node.shard_downloader
    node.inference_engine = SimpleNamespace(tokenizer=tokenizer)
    console = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    app.topology_viz = TopologyViz(console=console, live=False)
    app._register_callbacks()
    return app


async def test_tokens_reach_the_tui(tokenizer: Tokenizer) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    app = wired_app(node, tokenizer)
    status = {"type": "node_status", "node_id": "other", "status": "start_process_prompt", "prompt": "Why?"}
    node.on_opaque_status.trigger_all("req-1", json.dumps(status))
    tokens = reply_tokens(tokenizer)
    for token in tokens[:-1]:
        node.on_token.trigger_all("req-1", [token], False)
    request = app.topology_viz.requests["req-1"]
    assert request.prompt == "Why?"
    assert request.output == REPLY
    node.on_token.trigger_all("req-1", [tokens[-1]], True)
    assert request.finished_at is not None
    assert "req-1" not in app.tui_feed.outputs


def prompt_start_status(base: Shard, shard: Shard, **extra: object) -> dict[str, object]:
    """The status node `other` broadcasts when a prompt starts there."""
    return {
        "type": "node_status",
        "node_id": "other",
        "status": "start_process_prompt",
        "base_shard": base.to_dict(),
        "shard": shard.to_dict(),
        "prompt": "p",
        **extra,
    }


async def test_prompt_from_another_node_preloads_this_nodes_shard(tokenizer: Tokenizer) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    wired_app(node, tokenizer)
    base = Shard("llama-3.2-1b", 0, 0, 16)
    status = prompt_start_status(base, Shard("llama-3.2-1b", 0, 7, 16))
    node.on_opaque_status.trigger_all("req-2", json.dumps(status))
    await wait_until(lambda: node.shard_downloader.ensured)
    shard, engine = node.shard_downloader.ensured[0]
    assert shard == node.get_current_shard(base)
    assert engine == "CandleInferenceEngine"
    # Our own prompt starts, other statuses and garbage do not preload.
    node.on_opaque_status.trigger_all("req-3", json.dumps({**status, "node_id": node.id}))
    node.on_opaque_status.trigger_all("req-4", json.dumps({**status, "status": "end_process_prompt"}))
    node.on_opaque_status.trigger_all("req-5", "not json")
    await asyncio.sleep(0.05)
    assert len(node.shard_downloader.ensured) == 1


async def test_a_layer_plan_in_the_prompt_status_preloads_the_planned_shard(tokenizer: Tokenizer) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    wired_app(node, tokenizer)
    base = Shard("llama-3.2-1b", 0, 0, 16)
    plan = [
        {"node_id": "other", "start_layer": 0, "end_layer": 9},
        {"node_id": node.id, "start_layer": 10, "end_layer": 15},
    ]
    status = prompt_start_status(base, Shard("llama-3.2-1b", 0, 9, 16), layers=plan)
    node.on_opaque_status.trigger_all("req-6", json.dumps(status))
    await wait_until(lambda: node.shard_downloader.ensured)
    assert node.shard_downloader.ensured[0][0] == Shard("llama-3.2-1b", 10, 15, 16)
    # A plan without this node preloads nothing.
    node.on_opaque_status.trigger_all("req-7", json.dumps({**status, "layers": plan[:1]}))
    await asyncio.sleep(0.05)
    assert len(node.shard_downloader.ensured) == 1


async def test_download_progress_is_broadcast_throttled(tokenizer: Tokenizer) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    wired_app(node, tokenizer)
    shard = Shard("llama-3.2-1b", 0, 15, 16)
    for done in range(0, 100, 10):
        event = FakeRepoProgress(shard, "org/repo", done, 100)
        node.shard_downloader.on_progress.trigger_all(shard, event)
    node.shard_downloader.on_progress.trigger_all(shard, FakeRepoProgress(shard, "org/repo", 100, 100, "complete"))
    node.shard_downloader.on_progress.trigger_all(shard, FakeRepoProgress(shard, "org/repo", 100, 100, "complete"))
    await wait_until(lambda: len(node.broadcasts) >= 2)
    await asyncio.sleep(0.05)
    statuses = [json.loads(s) for _, s in node.broadcasts]
    assert [s["progress"]["status"] for s in statuses] == ["in_progress", "complete"]
    assert all(s["type"] == "download_progress" and s["node_id"] == node.id for s in statuses)
    assert all(request_id == "" for request_id, _ in node.broadcasts)


async def test_chat_requests_show_the_model_layers(tokenizer: Tokenizer, model_dir: Path) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    app = wired_app(node, tokenizer)
    chat = SimpleNamespace(model=str(model_dir), messages=[{"role": "user", "content": "What is a ring?"}])
    app._on_chat_request("req-9", chat, "<templated>What is a ring?</templated>")
    assert app.topology_viz.requests["req-9"].prompt == "What is a ring?"
    assert app.topology_viz.model == (
        str(model_dir),
        json.loads((model_dir / "config.json").read_text())["num_hidden_layers"],
    )
