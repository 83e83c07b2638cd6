"""The Rich topology TUI, rendered to a recorded console."""

from __future__ import annotations

import io

from rich.console import Console

from exo.inference.shard import Shard
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.topology.partitioning_strategy import Partition
from exo.topology.topology import Topology
from exo.viz.topology_viz import TopologyViz, compute_bar_position
from support.fake_node import FakeFileProgress, FakeRepoProgress


def render(viz: TopologyViz) -> str:
    viz.console.print(viz.render())
    return viz.console.export_text()


def make_viz(width: int = 120) -> TopologyViz:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    return TopologyViz(
        chatgpt_api_endpoints=["http://10.0.0.1:52415/v1/chat/completions"],
        web_chat_urls=["http://10.0.0.1:52415"],
        console=console,
        live=False,
    )


def two_nodes() -> tuple[Topology, list[Partition]]:
    topology = Topology()
    topology.update_node("node-a", DeviceCapabilities("Linux Box (EPYC)", "EPYC", 32768, DeviceFlops(1.5, 3.0, 6.0)))
    topology.update_node("node-b", DeviceCapabilities("MacBook Pro", "Apple M3", 16384, DeviceFlops(4.0, 8.0, 16.0)))
    topology.active_node_id = "node-b"
    return topology, [Partition("node-a", 0.0, 0.67), Partition("node-b", 0.67, 1.0)]


def test_ring_shows_each_node_and_the_urls() -> None:
    viz = make_viz()
    topology, partitions = two_nodes()
    viz.update_visualization(topology, partitions, node_id="node-a")
    viz.update_model("llama-3.2-1b", 16)
    text = render(viz)
    assert "Exo Cluster (2 nodes)" in text
    assert "Linux Box (EPYC) 32GB" in text
    assert "MacBook Pro 16GB" in text
    assert "3.00 TFLOPS" in text and "8.00 TFLOPS" in text
    assert "[0.00-0.67] layers 0-9" in text
    assert "[0.67-1.00] layers 10-15" in text
    assert "Web chat: http://10.0.0.1:52415" in text
    assert "ChatGPT API: http://10.0.0.1:52415/v1/chat/completions" in text
    assert "GPU poor" in text and "GPU rich" in text
    assert "11.00 TFLOPS" in text
    assert text.count("●") == 2
    assert "Prompt and Output" not in text
    assert "Download Progress" not in text


def test_a_layer_plan_shows_each_nodes_layers_and_the_memory_they_need() -> None:
    viz = make_viz()
    topology, partitions = two_nodes()
    viz.update_visualization(topology, partitions, node_id="node-a")
    viz.update_model("llama-3.2-1b", 16)
    viz.update_layer_plan(
        [
            {"node_id": "node-a", "start_layer": 0, "end_layer": 11, "memory_bytes": 3 * 2**30},
            {"node_id": "node-b", "start_layer": 12, "end_layer": 15, "memory_bytes": None},
        ]
    )
    text = render(viz)
    assert "[0.00-0.67] layers 0-11 3.00GB" in text
    assert "[0.67-1.00] layers 12-15" in text
    viz.update_layer_plan(None)
    assert "[0.00-0.67] layers 0-9" in make_text_again(viz)


def test_gpu_bar_moves_with_compute() -> None:
    assert compute_bar_position(0) == 0
    assert 0 < compute_bar_position(1) < compute_bar_position(100) < compute_bar_position(10_000) == 1
    poor, rich_ = make_viz(), make_viz()
    topology = Topology()
    topology.update_node("x", DeviceCapabilities("Tiny", "t", 1024, DeviceFlops(0.1, 0.1, 0.1)))
    poor.update_visualization(topology, [Partition("x", 0, 1)])
    big = Topology()
    big.update_node("y", DeviceCapabilities("Huge", "h", 1 << 20, DeviceFlops(500, 900, 1800)))
    rich_.update_visualization(big, [Partition("y", 0, 1)])

    def marker_column(text: str) -> int:
        return next(line.index("▼") for line in text.splitlines() if "▼" in line)

    assert marker_column(render(poor)) < marker_column(render(rich_))


def test_each_node_shows_its_limits() -> None:
    viz = make_viz()
    viz.update_visualization(*two_nodes())
    a, b = {"max_context": 4096, "max_kv_cache_gb": 8.0}, {"max_context": None, "max_kv_cache_gb": 2.5}
    viz.update_limits({"node-a": a, "node-b": b})
    text = render(viz)
    assert "ctx 4096 KV 8.0GB" in text
    assert "ctx auto KV 2.5GB" in text


def test_prompt_panel_shows_running_requests() -> None:
    viz = make_viz()
    viz.update_visualization(*two_nodes())
    viz.update_prompt("r1", "What is the capital of France?")
    viz.update_prompt_output("r1", "Paris is the capital")
    text = render(viz)
    assert "Prompt and Output" in text
    assert "What is the capital of France?" in text
    assert "Paris is the capital" in text


def test_finished_requests_leave_the_panel_after_a_while() -> None:
    viz = make_viz()
    viz.update_prompt("r1", "hello")
    viz.finish_request("r1")
    assert "Prompt and Output" in render(viz)
    viz.requests["r1"].finished_at -= 3600
    assert "Prompt and Output" not in make_text_again(viz)


def make_text_again(viz: TopologyViz) -> str:
    viz.console.file = io.StringIO()
    viz.console.export_text(clear=True)
    return render(viz)


def test_long_output_is_trimmed_to_its_end() -> None:
    viz = make_viz(width=80)
    viz.update_prompt("r1", "prompt " * 200)
    viz.update_prompt_output("r1", "start " + "word " * 500 + "THE-END")
    text = render(viz)
    assert "THE-END" in text
    assert "start word" not in text
    assert len(text.splitlines()) < 80


def test_download_panel_while_downloading() -> None:
    viz = make_viz()
    topology, partitions = two_nodes()
    shard = Shard("llama-3.2-1b", 0, 10, 16)
    own = FakeRepoProgress(
        shard,
        "unsloth/Llama-3.2-1B-Instruct",
        512 * 1024 * 1024,
        1024 * 1024 * 1024,
        completed_files=1,
        total_files=3,
        file_progress={
            "model-00001.safetensors": FakeFileProgress("model-00001.safetensors", 10, 10, "complete"),
            "model-00002.safetensors": FakeFileProgress("model-00002.safetensors", 25, 100),
        },
    )
    other = FakeRepoProgress(shard, "unsloth/Llama-3.2-1B-Instruct", 30, 40)
    viz.update_visualization(topology, partitions, "node-a", {"node-a": own, "node-b": other})
    text = render(viz)
    assert "Download Progress" in text
    assert "Downloading unsloth/Llama-3.2-1B-Instruct@main (1/3 files)" in text
    assert "512.00 MB / 1.00 GB" in text
    assert "model-00002.safetensors" in text and "25%" in text
    assert "model-00001.safetensors" not in text
    assert "MacBook Pro 16GB" in text and "75.0%" in text

    done = FakeRepoProgress(shard, "r", 40, 40, status="complete")
    viz.update_visualization(topology, partitions, "node-a", {"node-a": done})
    assert "Download Progress" not in make_text_again(viz)


def test_empty_cluster_waits() -> None:
    viz = make_viz()
    text = render(viz)
    assert "Exo Cluster (0 nodes)" in text
    assert "Waiting for the cluster" in text


def test_live_display_starts_and_stops() -> None:
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True)
    viz = TopologyViz(["http://h:1/v1/chat/completions"], ["http://h:1"], console=console, refresh_per_second=20)
    viz.update_visualization(*two_nodes())
    viz.update_prompt("r", "live prompt")
    viz.refresh()
    viz.stop()
    assert "live prompt" in console.export_text()
