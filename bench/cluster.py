"""Cluster benchmark over loopback: rings of 1, 2 (and 3, with cores enough) nodes, each node
a separate process pinned to its own core with `taskset` (standing in for separate machines),
against one node pinned to one core, on the same synthetic model.

    python bench/cluster.py [--preset llama-3.2-1b] [--dtype bf16] [--tokens 64] [--streams 4] [--rounds 3]

Every ring stays loaded for the whole run (one one-node ring per core, which together are the
side by side setup, and one ring of each larger size: with 2 cores, three copies of the model
in memory), and each round runs every setup back to back, so a ratio compares runs seconds
apart: this machine's speed drifts with its neighbours' load by more than the differences
measured. Ratios and the added hop latency are medians of each round's own figures.

Prints, for 1 stream and for `--streams` concurrent streams: decode tokens/s (for concurrent
streams, the aggregate while all of them decode), the ratio to one node, the ratio to as many
independent one-node rings decoding side by side (each on its own core: the cores of one
machine share its memory bus, which separate machines would not, so that is the most a
pipeline can reach here), the round trip of one hop's message (a SendTensor of
`[1, 1, hidden]` f32, timed in Rust and from Python), the latency a hop adds (from the
per-token time difference, spread over the ring's hops) and the bytes sent over loopback per
token (less the background rate of health checks and topology refreshes, measured while idle;
other loopback traffic on the machine counts too).
The requests start from a driver node in this process that holds no layers (it reports 0 MB),
as an API node would; it receives every token. Its candle engine reads only the model's
`config.json`, to balance the ring's layers against the LM head (all nodes run xotorch-core).
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _loopback_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    return 0


class FixedDiscovery:
    """The ring's members, known up front."""

    def __init__(self, peers: list) -> None:
        self.peers = peers

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def discover_peers(self, wait_for_peers: int = 0) -> list:
        return list(self.peers)


def _peer_handles(ports: dict[str, int], exclude: str) -> list:
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
    from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES

    return [
        GRPCPeerHandle(name, f"127.0.0.1:{port}", "bench", UNKNOWN_DEVICE_CAPABILITIES)
        for name, port in ports.items()
        if name != exclude
    ]


async def _serve(name: str, ports: dict[str, int]) -> None:
    """A worker node: serves until killed."""
    from exo.inference.candle import CandleInferenceEngine
    from exo.networking.grpc.grpc_server import GRPCServer
    from exo.orchestration.node import Node

    node = Node(name, None, CandleInferenceEngine(), FixedDiscovery(_peer_handles(ports, name)), None)
    node.max_generate_tokens = 1_000_000
    node.server = GRPCServer(node, "127.0.0.1", ports[name])
    await node.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def _spawn(name: str, core: int, ports: dict[str, int]) -> subprocess.Popen:
    peers = ",".join(f"{n}={p}" for n, p in ports.items())
    command = ["taskset", "-c", str(core), sys.executable, __file__, "--worker", name, "--ports", peers]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"worker {name} did not start")
    return process


def config_hidden(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


async def _transport_round_trip_ms(name: str, port: int, hidden: int, calls: int = 200) -> tuple[float, float]:
    """Median round trip of a SendTensor carrying `[1, 1, hidden]` f32 hidden states that the
    worker `name` on `port` decodes and rejects (its shard is invalid): the transport cost of a
    hop, timed in Rust (as one node's core sends to the next) and from Python (await on the
    peer handle)."""
    import numpy as np

    from exo.inference.shard import Shard
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
    from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES

    peer = GRPCPeerHandle(name, f"127.0.0.1:{port}", "probe", UNKNOWN_DEVICE_CAPABILITIES)
    rust_ms = await peer.measure_round_trip(hidden, calls) * 1000
    hidden_states = np.zeros((1, 1, hidden), dtype=np.float32)
    invalid = Shard("hop-probe", 1, 0, 2)
    times = []
    for i in range(calls):
        started = time.perf_counter()
        try:
            await peer.send_tensor(invalid, hidden_states, request_id=f"probe-{i}")
        except Exception:
            times.append(time.perf_counter() - started)
    return rust_ms, sorted(times)[len(times) // 2] * 1000


@contextlib.asynccontextmanager
async def driver_over(
    workers: list[subprocess.Popen], ports: dict[str, int], driver_name: str = "driver"
) -> AsyncIterator[Any]:
    """An in-process driver node that holds no layers, over the worker processes listening on
    `ports`; yields it once every worker holds layers and all agree on the ring, and kills the
    workers at the end."""
    from exo.inference.candle import CandleInferenceEngine
    from exo.networking.grpc.grpc_server import GRPCServer
    from exo.orchestration.node import Node
    from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

    peers = FixedDiscovery(_peer_handles(ports, driver_name))
    driver = Node(driver_name, None, CandleInferenceEngine(), peers, None)
    driver.device_capabilities = DeviceCapabilities("driver", "none", 0, DeviceFlops(0, 0, 0))
    driver.max_generate_tokens = 1_000_000
    driver.server = GRPCServer(driver, "127.0.0.1", ports[driver_name])
    try:
        await driver.start()
        while len([p for p in driver.partitions() if p.end > p.start]) != len(workers):
            await asyncio.sleep(0.5)
            await driver.update_peers()
            await driver.collect_topology(set())
        await asyncio.sleep(2.5)  # one refresh on every worker, so all agree on the ring
        yield driver
    finally:
        await driver.stop()
        for worker in workers:
            worker.kill()
            worker.wait()


@contextlib.asynccontextmanager
async def _ring(names: list[str], driver_name: str = "driver", first_core: int = 0) -> AsyncIterator[tuple[Any, dict]]:
    """Worker processes `names`, the i-th pinned to core `first_core + i`, and an in-process
    driver node that holds no layers; yields the driver, once every worker holds layers, and
    the ports."""
    from exo.helpers import find_available_port

    ports = {name: find_available_port("127.0.0.1") for name in [*names, driver_name]}
    workers = [_spawn(name, first_core + i, ports) for i, name in enumerate(names)]
    async with driver_over(workers, ports, driver_name) as driver:
        yield driver, ports


def _base(model_dir: Path) -> Any:
    from exo.inference.shard import Shard

    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return Shard(str(model_dir), 0, layers - 1, layers)


async def _stream(driver: Any, base: Any, count: int) -> list[float]:
    """The arrival time of each token of one stream."""
    arrivals = []
    async for _ in driver.generate(base, "Benchmark the ring of nodes.", max_tokens=count + 1):
        arrivals.append(time.perf_counter())
    return arrivals


def _decode_rate(arrivals: list[float]) -> float:
    # Decode time starts at the first token (the prompt is done by then).
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def _steady_rate(streams: list[list[float]]) -> float:
    """Aggregate tokens/s while every stream is decoding: from the last stream's first token to
    the first stream's last, so no stream's prompt or tail is counted."""
    start, end = max(s[0] for s in streams), min(s[-1] for s in streams)
    if end <= start:
        raise RuntimeError("the concurrent streams never decoded at the same time")
    return sum(start < t <= end for s in streams for t in s) / (end - start)


async def _bytes_per_token(driver: Any, base: Any, tokens: int) -> float:
    """Loopback bytes sent per token of one stream, less the idle background rate."""
    idle_started, idle_bytes = time.perf_counter(), _loopback_tx_bytes()
    await asyncio.sleep(4)
    idle_rate = (_loopback_tx_bytes() - idle_bytes) / (time.perf_counter() - idle_started)
    sent, started = _loopback_tx_bytes(), time.perf_counter()
    arrivals = await _stream(driver, base, tokens)
    return (_loopback_tx_bytes() - sent - idle_rate * (time.perf_counter() - started)) / max(len(arrivals) - 1, 1)


async def _concurrent(drivers: list[Any], base: Any, tokens: int, streams: int) -> float:
    """Aggregate tokens/s of `streams` streams spread over `drivers`' rings, all at once."""
    runs = [_stream(drivers[i % len(drivers)], base, tokens) for i in range(streams)]
    return _steady_rate(await asyncio.gather(*runs))


async def _bench(
    model_dir: Path, sizes: list[int], args: argparse.Namespace
) -> tuple[dict[str, dict[int, list[float]]], dict[int, dict[str, float]]]:
    """Every ring loaded at once — one-node rings on each core (together they are the side by
    side setup) and a ring of each size — then rounds that run every setup back to back, so
    each round's ratios compare runs seconds apart on the same machine state. Returns each
    round's rates by setup and ring size, and the transport figures measured once per ring."""
    base = _base(model_dir)
    hidden = config_hidden(model_dir)
    results: dict[str, dict[int, list[float]]] = {
        key: {n: [] for n in sizes} for key in ("single", "concurrent", "side")
    }
    transport: dict[int, dict[str, float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        ones = [await stack.enter_async_context(_ring([f"s{i}"], f"d{i}", i)) for i in range(max(sizes))]
        rings = {1: ones[0]}
        for n in sizes[1:]:
            rings[n] = await stack.enter_async_context(_ring([f"r{n}w{i}" for i in range(n)], f"r{n}d"))
        await asyncio.gather(*(_stream(driver, base, 4) for driver, _ in [*ones, *rings.values()]))
        for n, (driver, ports) in rings.items():
            first_worker = "s0" if n == 1 else f"r{n}w0"
            rust_rtt, python_rtt = await _transport_round_trip_ms(first_worker, ports[first_worker], hidden)
            bytes_per_token = await _bytes_per_token(driver, base, args.tokens)
            transport[n] = {"rust_rtt": rust_rtt, "python_rtt": python_rtt, "bytes": bytes_per_token}
        for round_number in range(1, args.rounds + 1):
            # Alternate the order too, so neither end of a round favours one setup.
            order = sizes if round_number % 2 else sizes[::-1]
            for n in order:
                results["single"][n].append(_decode_rate(await _stream(rings[n][0], base, args.tokens)))
            for n in order:
                results["concurrent"][n].append(await _concurrent([rings[n][0]], base, args.tokens, args.streams))
                if n > 1:
                    drivers = [driver for driver, _ in ones[:n]]
                    results["side"][n].append(await _concurrent(drivers, base, args.tokens, args.streams))
            rates = ", ".join(
                f"{n} node(s) {results['single'][n][-1]:.2f} / {results['concurrent'][n][-1]:.2f}"
                + (f" (side by side {results['side'][n][-1]:.2f})" if n > 1 else "")
                for n in sizes
            )
            print(f"round {round_number}, tok/s for 1 / {args.streams} streams: {rates}", flush=True)
    return results, transport


def _ratio(values: list[float], reference: list[float]) -> float:
    """The median over rounds of each round's `value / reference`."""
    return statistics.median(v / r for v, r in zip(values, reference, strict=True))


def _hop_ms(ring: list[float], one: list[float], hops: int) -> float:
    """The median over rounds of the time a ring adds per token, spread over its hops."""
    return statistics.median((1 / v - 1 / r) * 1000 / hops for v, r in zip(ring, one, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every setup back to back; medians shown")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "xotorch-bench-models")
    parser.add_argument("--worker")
    parser.add_argument("--ports")
    args = parser.parse_args()
    if args.worker:
        ports = {k: int(v) for k, v in (item.split("=") for item in args.ports.split(","))}
        asyncio.run(_serve(args.worker, ports))
        return
    from exo.testing.synth import cached_model

    model_dir = cached_model(args.preset, args.models, args.dtype)
    cores = len(os.sched_getaffinity(0))
    sizes = [n for n in (1, 2, 3) if n <= cores]
    results, transport = asyncio.run(_bench(model_dir, sizes, args))
    single, concurrent, side = results["single"], results["concurrent"], results["side"]
    print(
        f"{args.preset} {args.dtype}, {args.tokens} tokens per stream, one core per node ({cores} cores),"
        f" medians of {args.rounds} round(s); ratios are the median of each round's ratio"
    )
    for n in sizes[1:]:
        print(
            f"{n} one-node rings side by side, {args.streams} streams in all: {statistics.median(side[n]):.2f} tok/s,"
            f" {_ratio(side[n], concurrent[1]):.2f}x one node"
            f" (what {n} cores sharing this memory bus give)"
        )
    print(
        f"nodes | 1 stream tok/s | ratio | hop ms | RPC ms Rust / Python | bytes/token"
        f" | {args.streams} streams tok/s | ratio | of side by side"
    )
    for n in sizes:
        # Per token, a ring of n > 1 nodes makes n hops; compute per token stays the same.
        hop_ms = _hop_ms(single[n], single[1], n) if n > 1 else 0.0
        of_side = _ratio(concurrent[n], side[n]) if n > 1 else 1.0
        print(
            f"{n:5} | {statistics.median(single[n]):14.2f} | {_ratio(single[n], single[1]):5.2f} |"
            f" {hop_ms:6.3f} | {transport[n]['rust_rtt']:8.3f} / {transport[n]['python_rtt']:6.3f} |"
            f" {transport[n]['bytes']:11.0f} | {statistics.median(concurrent[n]):16.2f} |"
            f" {_ratio(concurrent[n], concurrent[1]):5.2f} | {of_side:15.2f}"
        )


if __name__ == "__main__":
    main()
