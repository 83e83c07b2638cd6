"""Serving benchmark: real nodes (`python -m exo.main`) on a synthetic model, driven through the
OpenAI-compatible API by 1, 2, 4, 8 and 16 concurrent streaming clients over real HTTP.

    python bench/serve.py [--preset llama-3.2-1b] [--model bf16 q4_k_m] [--clients 1 2 4 8 16]
                          [--tokens 64] [--threads 2] [--two-nodes 8] [--plot serve.png]

For each model (`bf16`/`f16`/`f32`: a safetensors checkpoint; a GGUF type such as `q4_k_m` or
`q8_0`: a GGUF file of the same synthetic weights), one node serves every concurrency level
in turn; each level starts all its clients at once, each with its own prompt, asking for
`--tokens` greedy tokens. Printed per level: aggregate tokens/s (all streams' tokens over
the level's wall time, prefills included), aggregate decode tokens/s (the sum of the streams'
decode rates), per-stream decode tokens/s (a stream's tokens after the first over the time
after it, median), TTFT p50/p99, inter-token latency p50/p99 (gaps between streamed chunks), and the
ratio of each to the 1-client level. A node started with `--max-batch 1` (no batching, as
before it existed) serves one client too, for the 1-stream ratio. `--two-nodes N` adds a run
of N clients against two nodes on this machine that split the model (each with half the
threads), printed beside one node's N-client run. `--plot` writes the aggregate and
per-stream rates and the latencies per level as a PNG (matplotlib). The synthetic tokenizer gets
a plain word for every id the model
can sample (see `_visible_tokenizer`), so that each token streams as a chunk and is timed.

Each node runs with `RAYON_NUM_THREADS=--threads`; TTFT includes the prompt's prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from exo.helpers import find_available_port

SAFETENSORS_DTYPES = ("bf16", "f16", "f32")
WARM_UP_TOKENS = 8


@dataclass
class Stream:
    """One client's streamed completion: when it started, when each chunk arrived, tokens in all."""

    started: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class Level:
    """One concurrency level's figures."""

    clients: int
    aggregate: float
    decode: float
    per_stream: float
    ttft: tuple[float, float]
    inter_token: tuple[float, float]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _prompt(i: int) -> str:
    return f"Client {i} asks: tell me everything you know about the number {i * 7919 % 1000} and its neighbours."


async def _one_stream(session: aiohttp.ClientSession, url: str, model: str, i: int, tokens: int) -> Stream:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": _prompt(i)}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = Stream(started=time.perf_counter())
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"client {i}: HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                stream.tokens = chunk["usage"]["completion_tokens"]
            if any(choice["delta"].get("content") for choice in chunk.get("choices", [])):
                stream.arrivals.append(time.perf_counter())
    return stream


async def _level(url: str, model: str, clients: int, tokens: int) -> Level:
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        streams = await asyncio.gather(*(_one_stream(session, url, model, i, tokens) for i in range(clients)))
        wall = time.perf_counter() - started
    ttfts = [s.arrivals[0] - s.started for s in streams if s.arrivals]
    gaps = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    rates = [(s.tokens - 1) / (s.arrivals[-1] - s.arrivals[0]) for s in streams if len(s.arrivals) > 1 and s.tokens > 1]
    return Level(
        clients=clients,
        aggregate=sum(s.tokens for s in streams) / wall,
        decode=sum(rates) if rates else float("nan"),
        per_stream=statistics.median(rates) if rates else float("nan"),
        ttft=(percentile(ttfts, 0.5), percentile(ttfts, 0.99)),
        inter_token=(percentile(gaps, 0.5), percentile(gaps, 0.99)),
    )


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def _wait_until(condition, process: subprocess.Popen, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the node exited while waiting for {what}")
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"never saw {what}")


def _node_config(ports: dict[str, int], memory_mb: int) -> dict:
    caps = {"model": "bench", "chip": "cpu", "memory": memory_mb, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}
    peers = {name: {"address": "127.0.0.1", "port": port, "device_capabilities": caps} for name, port in ports.items()}
    return {"peers": peers}


@contextmanager
def _nodes(model: str, count: int, threads: int, workdir: Path, extra: list[str]) -> Iterator[str]:
    """`count` nodes (manual discovery over loopback) serving `model`; yields the first's API URL."""
    names = [f"bench{i}" for i in range(count)]
    ports = {name: find_available_port("127.0.0.1") for name in names}
    config = workdir / f"peers-{os.getpid()}-{time.monotonic_ns()}.json"
    config.write_text(json.dumps(_node_config(ports, 16_384)))
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    processes, api_ports = [], []
    for name in names:
        api_port = find_available_port("127.0.0.1")
        command = [
            sys.executable, "-m", "exo.main", "--inference-engine", "candle", "--disable-tui",
            "--node-id", name, "--node-host", "127.0.0.1", "--node-port", str(ports[name]),
            "--chatgpt-api-port", str(api_port), "--discovery-module", "manual",
            "--discovery-config-path", str(config), "--default-model", model, *extra,
        ]  # fmt: skip
        log = open(workdir / f"{name}.log", "w")  # closed when the process ends
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        api_ports.append(api_port)
    try:
        for process, port in zip(processes, api_ports, strict=True):
            _wait_until(
                lambda p=port: len(_get_json(f"http://127.0.0.1:{p}/topology")["nodes"]) == count,  # type: ignore[index]
                process,
                f"{count} nodes",
            )
        yield f"http://127.0.0.1:{api_ports[0]}"
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _serve_levels(url: str, model: str, levels: list[int], tokens: int) -> list[Level]:
    asyncio.run(_level(url, model, 1, WARM_UP_TOKENS))  # loads the model, untimed
    return [asyncio.run(_level(url, model, clients, tokens)) for clients in levels]


def _visible_tokenizer(model_dir: Path, out: Path) -> None:
    """`model_dir`'s tokenizer with a plain word for every id past its trained vocabulary, into `out`.

    The synthetic tokenizer knows a few hundred tokens while the model samples from its whole vocabulary, so most
    sampled ids would decode to nothing and stream no chunk; with a word each, every token streams as it comes.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f"w{i}" for i in range(tokenizer.get_vocab_size(), vocab)])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text((model_dir / "tokenizer_config.json").read_text())


def _model_path(kind: str, preset: str, root: Path) -> str:
    """The model to serve: the synthetic checkpoint (or GGUF file) linked into a directory beside it, with the
    tokenizer of `_visible_tokenizer`."""
    from exo.testing.synth import cached_model

    safetensors = cached_model(preset, root, kind if kind in SAFETENSORS_DTYPES else "bf16")
    served = root / f"{preset}-{kind}-served"
    if served.exists():
        return str(next(served.glob("*.gguf"), served))
    partial = root / f"{served.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if kind in SAFETENSORS_DTYPES:
        for file in safetensors.iterdir():
            if file.name not in ("tokenizer.json", "tokenizer_config.json"):
                (partial / file.name).symlink_to(file.resolve())
    else:
        from exo.testing.synth_gguf import cached_gguf

        gguf = cached_gguf(preset, root, kind)[0]
        (partial / gguf.name).symlink_to(gguf.resolve())
    _visible_tokenizer(safetensors, partial)
    partial.rename(served)
    return str(next(served.glob("*.gguf"), served))


def _print_table(title: str, rows: list[Level], base: Level, solo_unbatched: Level | None) -> None:
    print(f"\n{title}")
    print(
        f"{'clients':>7} {'agg tok/s':>10} {'x1':>6} {'decode tok/s':>12} {'x1':>6} {'stream tok/s':>12} {'x1':>6} "
        f"{'TTFT p50/p99 s':>15} {'ITL p50/p99 ms':>15} {'ITL p99 x1':>10}"
    )
    for r in rows:
        print(
            f"{r.clients:>7} {r.aggregate:>10.2f} {r.aggregate / base.aggregate:>6.2f} "
            f"{r.decode:>12.2f} {r.decode / base.decode:>6.2f} {r.per_stream:>12.2f} "
            f"{r.per_stream / base.per_stream:>6.2f} {r.ttft[0]:>7.2f}/{r.ttft[1]:<7.2f} "
            f"{1000 * r.inter_token[0]:>7.0f}/{1000 * r.inter_token[1]:<7.0f} "
            f"{r.inter_token[1] / base.inter_token[1]:>10.2f}"
        )
    if solo_unbatched is not None:
        print(
            f"1 client without batching (--max-batch 1): {solo_unbatched.per_stream:.2f} tok/s per stream; "
            f"with batching {base.per_stream / solo_unbatched.per_stream:.2f}x of it"
        )
    by_clients = {r.clients: r for r in rows}
    for clients, target in ((8, 4.0), (16, 6.0)):
        if clients in by_clients:
            ratio = by_clients[clients].decode / base.decode
            print(f"target: aggregate decode at {clients} streams >= {target}x one stream: {ratio:.2f}x")
    if 8 in by_clients:
        ratio = by_clients[8].inter_token[1] / base.inter_token[1]
        print(f"target: inter-token p99 at 8 streams <= 3x one stream's: {ratio:.2f}x")


def _plot(path: Path, results: dict[str, list[Level]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, latency) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        clients = [r.clients for r in rows]
        rates.plot(clients, [r.aggregate for r in rows], marker="o", label=f"{name} aggregate")
        rates.plot(clients, [r.decode for r in rows], marker="s", label=f"{name} aggregate decode")
        rates.plot(clients, [r.per_stream for r in rows], marker="x", linestyle="--", label=f"{name} per stream")
        latency.plot(clients, [1000 * r.inter_token[1] for r in rows], marker="o", label=f"{name} ITL p99")
        latency.plot(clients, [1000 * r.ttft[0] for r in rows], marker="x", linestyle="--", label=f"{name} TTFT p50")
    for axis, label in ((rates, "tokens/s"), (latency, "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streaming clients")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    rates.set_title("decode throughput")
    latency.set_title("latency")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--model", nargs="+", default=["bf16"], help="bf16, f16, f32, or a GGUF type (q4_k_m, q8_0)")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64, help="tokens each client asks for")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--two-nodes", type=int, default=0, metavar="N", help="also run N clients on two nodes")
    parser.add_argument("--plot", type=Path, help="write a PNG of the levels here")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "xotorch-bench-models")
    args = parser.parse_args()
    levels = sorted(set(args.clients) | {1})
    results: dict[str, list[Level]] = {}
    with tempfile.TemporaryDirectory() as work:
        workdir = Path(work)
        for kind in args.model:
            model = _model_path(kind, args.preset, args.models)
            with _nodes(model, 1, args.threads, workdir, ["--max-batch", "1"]) as url:
                unbatched = _serve_levels(url, model, [1], args.tokens)[0]
            with _nodes(model, 1, args.threads, workdir, []) as url:
                rows = _serve_levels(url, model, levels, args.tokens)
            results[kind] = rows
            title = f"{args.preset} {kind}, one node, {args.threads} threads, {args.tokens} tokens per client"
            _print_table(title, rows, rows[0], unbatched)
            if args.two_nodes:
                half = max(1, args.threads // 2)
                with _nodes(model, 2, half, workdir, []) as url:
                    pair = _serve_levels(url, model, [1, args.two_nodes], args.tokens)
                one_node = next((r for r in rows if r.clients == args.two_nodes), None)
                _print_table(f"{args.preset} {kind}, two nodes of {half} threads each", pair, pair[0], None)
                if one_node is not None:
                    print(
                        f"{args.two_nodes} clients: two nodes {pair[-1].aggregate:.2f} tok/s aggregate "
                        f"vs one node {one_node.aggregate:.2f} ({pair[-1].aggregate / one_node.aggregate:.2f}x)"
                    )
    if args.plot:
        _plot(args.plot, results)


if __name__ == "__main__":
    main()
