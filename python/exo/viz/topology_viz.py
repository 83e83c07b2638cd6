"""The node's terminal view (Rich): the ring of nodes, the cluster's compute, running prompts and downloads.

Updates only change state; a Rich `Live` display redraws from that state at a bounded rate, so a burst of
updates (one per token) never floods the terminal.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from exo.terminal import exo_text, pretty_print_bytes, pretty_print_bytes_per_second
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES
from exo.topology.partitioning_strategy import Partition, map_partitions_to_shards
from exo.topology.topology import Topology

MAX_CANVAS_WIDTH = 110
RING_ROWS = 17
RECENT_REQUESTS = 3
FINISHED_REQUEST_SHOWN_S = 60.0
MAX_FILES_SHOWN = 8
# The bar's right end: the aggregate fp16 TFLOPS at which a cluster counts as "GPU rich".
RICH_TFLOPS = 1000.0
BAR_WIDTH = 30
BAR_COLORS = ("red", "dark_orange", "yellow", "green")


@dataclass
class _Request:
    prompt: str = ""
    output: str = ""
    finished_at: float | None = None
    updated_at: float = field(default_factory=time.monotonic)


def compute_bar_position(total_tflops: float) -> float:
    """Where `total_tflops` sits on the GPU poor → GPU rich bar, from 0 to 1 (logarithmic)."""
    if total_tflops <= 0:
        return 0.0
    return min(1.0, math.log10(1.0 + total_tflops) / math.log10(1.0 + RICH_TFLOPS))


class _Canvas:
    """A grid of styled characters."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.cells: list[list[tuple[str, str]]] = [[(" ", "")] * width for _ in range(height)]

    def put(self, x: int, y: int, text: str, style: str = "") -> None:
        if not 0 <= y < self.height:
            return
        for i, char in enumerate(text):
            if 0 <= x + i < self.width:
                self.cells[y][x + i] = (char, style)

    def line(self, x0: int, y0: int, x1: int, y1: int, style: str) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0))
        for step in range(1, steps):
            x = round(x0 + (x1 - x0) * step / steps)
            y = round(y0 + (y1 - y0) * step / steps)
            if self.cells[y][x][0] == " ":
                self.put(x, y, "·", style)

    def to_text(self) -> Text:
        """The grid as styled text, without its blank first and last rows."""
        rows = list(self.cells)
        while rows and all(char == " " for char, _ in rows[0]):
            rows.pop(0)
        while rows and all(char == " " for char, _ in rows[-1]):
            rows.pop()
        text = Text()
        for row_index, row in enumerate(rows):
            for char, style in row:
                text.append(char, style)
            if row_index < len(rows) - 1:
                text.append("\n")
        text.rstrip()
        return text


class TopologyViz:
    """exo classic's TUI. Pass `console` to draw elsewhere and `live=False` to render only on demand (tests)."""

    def __init__(
        self,
        chatgpt_api_endpoints: Sequence[str] = (),
        web_chat_urls: Sequence[str] = (),
        *,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
        live: bool = True,
    ) -> None:
        self.chatgpt_api_endpoints = list(chatgpt_api_endpoints)
        self.web_chat_urls = list(web_chat_urls)
        self.topology: Any = Topology()
        self.partitions: list[Partition] = []
        self.node_id: str | None = None
        self.node_download_progress: dict[str, Any] = {}
        self.requests: OrderedDict[str, _Request] = OrderedDict()
        self.model: tuple[str, int] | None = None
        # The model's layers per node as the node would split it, with the memory they need.
        self.layer_plan: list[dict[str, Any]] | None = None
        # Each node's `max_context` and `max_kv_cache_gb` (`Node.limits_by_node`).
        self.limits: dict[str, dict[str, Any]] = {}
        self.console = console or Console()
        self._lock = threading.RLock()
        self._live: Live | None = None
        if live:
            self._live = Live(
                console=self.console,
                auto_refresh=True,
                refresh_per_second=refresh_per_second,
                get_renderable=self.render,
                # Other output (logs, prints) then scrolls above the live view instead of tearing it.
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start()

    # ------------------------------------------------------------------ updates (cheap, any thread)

    def update_visualization(
        self,
        topology: Any,
        partitions: Sequence[Partition],
        node_id: str | None = None,
        node_download_progress: dict[str, Any] | None = None,
    ) -> None:
        with self._lock:
            self.topology = topology
            self.partitions = list(partitions)
            self.node_id = node_id
            if node_download_progress:
                self.node_download_progress = dict(node_download_progress)

    def update_prompt(self, request_id: str, prompt: str | None = None) -> None:
        with self._lock:
            request = self.requests.setdefault(request_id, _Request())
            request.prompt = prompt or ""
            request.updated_at = time.monotonic()
            self.requests.move_to_end(request_id)
            while len(self.requests) > 4 * RECENT_REQUESTS:
                self.requests.popitem(last=False)

    def update_prompt_output(self, request_id: str, output: str | None = None) -> None:
        with self._lock:
            request = self.requests.setdefault(request_id, _Request())
            request.output = output or ""
            request.updated_at = time.monotonic()

    def finish_request(self, request_id: str) -> None:
        """Marks a request done; its panel entry fades out after a minute."""
        with self._lock:
            request = self.requests.get(request_id)
            if request is not None:
                request.finished_at = time.monotonic()

    def update_model(self, model_id: str, n_layers: int) -> None:
        """The model being served, so each node can show its layer range."""
        with self._lock:
            self.model = (model_id, n_layers)

    def update_layer_plan(self, plan: Sequence[dict[str, Any]] | None) -> None:
        """The model's layers per node as the node would split it (`Node.layer_plan`), with the memory each needs;
        `None` falls back to the partitions' layer ranges."""
        with self._lock:
            self.layer_plan = list(plan) if plan is not None else None

    def update_limits(self, limits: dict[str, dict[str, Any]]) -> None:
        """Each node's limits (`Node.limits_by_node`), shown under its device."""
        with self._lock:
            self.limits = dict(limits)

    def stop(self) -> None:
        """Ends the live display (the last frame stays on screen)."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def refresh(self) -> None:
        """Redraws now (the live display also redraws by itself)."""
        if self._live is not None:
            self._live.refresh()

    # ------------------------------------------------------------------ rendering

    def render(self) -> RenderableType:
        with self._lock:
            parts: list[RenderableType] = [self._main_panel()]
            prompts = self._visible_requests()
            if prompts:
                parts.append(self._prompt_panel(prompts))
            if self._downloading():
                parts.append(self._download_panel())
            return Group(*parts)

    def _width(self) -> int:
        return max(40, min(self.console.width - 4, MAX_CANVAS_WIDTH))

    def _device(self, node_id: str) -> Any:
        device = self.topology.nodes.get(node_id) if self.topology is not None else None
        return device or UNKNOWN_DEVICE_CAPABILITIES

    def _total_tflops(self) -> float:
        ids = [p.node_id for p in self.partitions] or list(self.topology.nodes)
        return sum(float(self._device(i).flops.fp16) for i in ids)

    def _main_panel(self) -> Panel:
        width = self._width()
        body = Text()
        for line in exo_text.strip("\n").split("\n"):
            body.append(line.center(width).rstrip() + "\n", "bold bright_yellow")
        body.append("\n")
        if self.web_chat_urls:
            body.append(f"Web chat: {self.web_chat_urls[0]}".center(width).rstrip() + "\n", "cyan")
        if self.chatgpt_api_endpoints:
            body.append(f"ChatGPT API: {self.chatgpt_api_endpoints[0]}".center(width).rstrip() + "\n", "cyan")
        body.append("\n")
        body.append_text(self._compute_bar(width))
        body.append("\n\n")
        body.append_text(self._ring(width))
        count = len(self.topology.nodes)
        title = f"Exo Cluster ({count} node{'' if count == 1 else 's'})"
        return Panel(body, title=title, border_style="bright_yellow", width=width + 4)

    def _compute_bar(self, width: int) -> Text:
        total = self._total_tflops()
        position = round(compute_bar_position(total) * (BAR_WIDTH - 1))
        left = (width - BAR_WIDTH) // 2
        marker = Text(" " * (left + position) + "▼\n", "bold")
        bar = Text(" " * max(0, left - 10) + "GPU poor  ", "bold red")
        for i in range(BAR_WIDTH):
            bar.append("█", BAR_COLORS[min(len(BAR_COLORS) - 1, i * len(BAR_COLORS) // BAR_WIDTH)])
        bar.append("  GPU rich\n", "bold green")
        label = f"{total:.2f} TFLOPS"
        value = Text(" " * max(0, left + position - len(label) // 2) + label, "bold")
        return Text.assemble(marker, bar, value)

    def _layer_ranges(self) -> dict[str, str]:
        if self.model is not None and self.layer_plan:
            ranges = {}
            for held in self.layer_plan:
                memory = held.get("memory_bytes")
                needs = f" {memory / 2**30:.2f}GB" if memory is not None else ""
                ranges[held["node_id"]] = f"layers {held['start_layer']}-{held['end_layer']}{needs}"
            return ranges
        if self.model is None or not self.partitions:
            return {}
        model_id, n_layers = self.model
        try:
            shards = map_partitions_to_shards(self.partitions, n_layers, model_id)
        except Exception:
            return {}
        return {
            p.node_id: f"layers {s.start_layer}-{s.end_layer}" for p, s in zip(self.partitions, shards, strict=False)
        }

    def _node_lines(self, node_id: str, partition: Partition | None, layers: dict[str, str]) -> list[str]:
        device = self._device(node_id)
        lines = [f"{device.model} {device.memory // 1024}GB", f"{device.flops.fp16:.2f} TFLOPS"]
        limits = self.limits.get(node_id)
        if limits is not None:
            context = limits.get("max_context")
            lines.append(f"ctx {context if context is not None else 'auto'} KV {limits['max_kv_cache_gb']:.1f}GB")
        if partition is not None:
            share = f"[{partition.start:.2f}-{partition.end:.2f}]"
            layer = layers.get(node_id)
            lines.append(f"{share} {layer}" if layer else share)
        return lines

    def _ring(self, width: int) -> Text:
        ids = [p.node_id for p in self.partitions] or list(self.topology.nodes)
        if not ids:
            return Text("Waiting for the cluster…".center(width).rstrip(), "dim")
        by_id = {p.node_id: p for p in self.partitions}
        layers = self._layer_ranges()
        canvas = _Canvas(width, RING_ROWS)
        center_x, center_y = width // 2, RING_ROWS // 2
        radius_x, radius_y = max(8, width // 5), RING_ROWS // 2 - 2
        points = []
        for i in range(len(ids)):
            # Clockwise from the left, so two nodes sit side by side.
            angle = math.pi + 2 * math.pi * i / len(ids)
            x = center_x if len(ids) == 1 else round(center_x + radius_x * math.cos(angle))
            y = center_y if len(ids) == 1 else round(center_y + radius_y * math.sin(angle))
            points.append((x, y))
        if len(ids) > 1:
            for i, (x, y) in enumerate(points):
                nx, ny = points[(i + 1) % len(points)]
                canvas.line(x, y, nx, ny, "bright_black")
        for node_id, (x, y) in zip(ids, points, strict=True):
            if node_id == getattr(self.topology, "active_node_id", None):
                style = "bold red"
            elif node_id == self.node_id:
                style = "bold green"
            else:
                style = "bold blue"
            canvas.put(x, y, "●", style)
            lines = self._node_lines(node_id, by_id.get(node_id), layers)
            longest = max(len(line) for line in lines)
            text_x = x + 2 if x >= center_x else x - 1 - longest
            text_x = max(0, min(width - longest, text_x))
            text_y = max(0, min(RING_ROWS - len(lines), y - len(lines) // 2))
            info_style = "green" if node_id == self.node_id else "white"
            for j, line in enumerate(lines):
                canvas.put(text_x, text_y + j, line, info_style)
        return canvas.to_text()

    def _visible_requests(self) -> list[_Request]:
        now = time.monotonic()
        shown = [
            r
            for r in self.requests.values()
            if (r.prompt or r.output) and (r.finished_at is None or now - r.finished_at < FINISHED_REQUEST_SHOWN_S)
        ]
        return shown[-RECENT_REQUESTS:]

    def _prompt_panel(self, requests: list[_Request]) -> Panel:
        width = self._width()
        body = Text()
        for request in reversed(requests):
            prompt = " ".join(request.prompt.split())
            if len(prompt) > 2 * width:
                prompt = prompt[: 2 * width - 1] + "…"
            body.append("💬 ", "bold bright_blue")
            body.append(prompt + "\n", "white")
            if request.output:
                output = request.output.strip()
                if len(output) > 4 * width:
                    output = "…" + output[-(4 * width - 1) :]
                body.append("🤖 ", "bold bright_magenta")
                body.append(output + "\n", "white")
            body.append("\n")
        body.rstrip()
        return Panel(body, title="Prompt and Output", border_style="green", width=width + 4)

    def _downloading(self) -> bool:
        return any(getattr(p, "status", None) == "in_progress" for p in self.node_download_progress.values())

    @staticmethod
    def _progress_table() -> Table:
        table = Table(show_header=False, box=None, padding=(0, 1), expand=True)
        table.add_column("what", no_wrap=True, ratio=5)
        table.add_column("bar", no_wrap=True, ratio=4)
        table.add_column("pct", no_wrap=True, justify="right", ratio=1)
        return table

    def _download_panel(self) -> Panel:
        parts: list[RenderableType] = []
        own = self.node_download_progress.get(self.node_id) if self.node_id else None
        if own is not None and own.status == "in_progress":
            parts.extend(self._own_download(own))
        others = [(i, p) for i, p in self.node_download_progress.items() if i != self.node_id]
        if others:
            parts.append(Text("Other nodes:", "bold"))
        table = self._progress_table()
        for node_id, progress in others:
            device = self._device(node_id)
            total = max(1, int(progress.total_bytes))
            done = int(progress.downloaded_bytes)
            speed = pretty_print_bytes_per_second(progress.overall_speed)
            table.add_row(
                f"{device.model} {device.memory // 1024}GB: {progress.repo_id} ({speed})",
                ProgressBar(total=total, completed=done, width=BAR_WIDTH),
                f"{100 * done / total:.1f}%",
            )
        if others:
            parts.append(table)
        return Panel(Group(*parts), title="Download Progress", border_style="cyan", width=self._width() + 4)

    def _own_download(self, progress: Any) -> list[RenderableType]:
        title = (
            f"Downloading {progress.repo_id}@{progress.repo_revision} "
            f"({progress.completed_files}/{progress.total_files} files)"
        )
        eta = getattr(progress, "overall_eta", None)
        eta_text = f", {int(eta.total_seconds())}s left" if eta is not None else ""
        summary = (
            f"{pretty_print_bytes(progress.downloaded_bytes)} / {pretty_print_bytes(progress.total_bytes)} "
            f"({pretty_print_bytes_per_second(progress.overall_speed)}){eta_text}"
        )
        table = self._progress_table()
        files = [f for f in progress.file_progress.values() if f.status != "complete"]
        for file in files[:MAX_FILES_SHOWN]:
            total = max(1, int(file.total))
            table.add_row(
                Text(file.file_path, "cyan", overflow="ellipsis"),
                ProgressBar(total=total, completed=int(file.downloaded), width=BAR_WIDTH),
                f"{100 * file.downloaded / total:.0f}%",
            )
        return [Text(title, "bold"), Text(summary), table]
