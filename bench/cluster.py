"""Cluster benchmark over loopback: rings of 1, 2 (and 3, with cores enough) nodes, each node
a separate process pinned to its own core with `taskset` (standing in for separate machines),
against one node pinned to one core, on the same synthetic model.

    python bench/cluster.py [--preset llama-3.2-1b] [--dtype bf16] [--tokens 64] [--streams 4] [--rounds 1]

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


async def _transport_round_trip_ms(peer: object, hidden: int, calls: int = 200) -> tuple[float, float]:
    """Median round trip of a SendTensor carrying `[1, 1, hidden]` f32 hidden states that the
    peer decodes and rejects (its shard is invalid): the transport cost of a hop, timed in Rust
    (as one node's core sends to the next) and from Python (await on the peer handle)."""
    import numpy as np

    from exo.inference.shard import Shard

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
async def _ring(names: list[str], driver_name: str = "driver", first_core: int = 0) -> AsyncIterator[tuple[Any, dict]]:
    """Worker processes `names`, the i-th pinned to core `first_core + i`, and an in-process
    driver node that holds no layers; yields the driver, once every worker holds layers, and
    the ports."""
    from exo.helpers import find_available_port
    from exo.inference.candle import CandleInferenceEngine
    from exo.networking.grpc.grpc_server import GRPCServer
    from exo.orchestration.node import Node
    from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

    ports = {name: find_available_port("127.0.0.1") for name in [*names, driver_name]}
    workers = [_spawn(name, first_core + i, ports) for i, name in enumerate(names)]
    peers = FixedDiscovery(_peer_handles(ports, driver_name))
    driver = Node(driver_name, None, CandleInferenceEngine(), peers, None)
    driver.device_capabilities = DeviceCapabilities("driver", "none", 0, DeviceFlops(0, 0, 0))
    driver.max_generate_tokens = 1_000_000
    driver.server = GRPCServer(driver, "127.0.0.1", ports[driver_name])
    try:
        await driver.start()
        while len([p for p in driver.partitions() if p.end > p.start]) != len(names):
            await asyncio.sleep(0.5)
            await driver.update_peers()
            await driver.collect_topology(set())
        await asyncio.sleep(2.5)  # one refresh on every worker, so all agree on the ring
        yield driver, ports
    finally:
        await driver.stop()
        for worker in workers:
            worker.kill()
            worker.wait()


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


async def _measure(model_dir: Path, nodes: int, tokens: int, streams: int) -> dict[str, float]:
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
    from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES

    base = _base(model_dir)
    async with _ring([f"w{i}" for i in range(nodes)]) as (driver, ports):
        await _stream(driver, base, 4)
        # Peers exchange health checks and topology in the background; subtract that rate.
        idle_started, idle_bytes = time.perf_counter(), _loopback_tx_bytes()
        await asyncio.sleep(4)
        idle_rate = (_loopback_tx_bytes() - idle_bytes) / (time.perf_counter() - idle_started)
        sent, started = _loopback_tx_bytes(), time.perf_counter()
        single = await _stream(driver, base, tokens)
        single_bytes = _loopback_tx_bytes() - sent - idle_rate * (time.perf_counter() - started)
        probe = GRPCPeerHandle("w0", f"127.0.0.1:{ports['w0']}", "probe", UNKNOWN_DEVICE_CAPABILITIES)
        rust_rtt_ms, python_rtt_ms = await _transport_round_trip_ms(probe, config_hidden(model_dir))
        concurrent = await asyncio.gather(*(_stream(driver, base, tokens) for _ in range(streams)))
        return {
            "single_tps": _decode_rate(single),
            "bytes_per_token": single_bytes / max(len(single) - 1, 1),
            "concurrent_tps": _steady_rate(concurrent),
            "rust_rtt_ms": rust_rtt_ms,
            "python_rtt_ms": python_rtt_ms,
        }


async def _side_by_side(model_dir: Path, rings: int, tokens: int, streams: int) -> float:
    """Aggregate tokens/s of `rings` independent one-node rings decoding at once, each node on
    its own core, `streams` streams in all: what this machine's cores give together when they
    share nothing but its memory bus, the most a pipeline across them can reach here."""
    base = _base(model_dir)
    async with contextlib.AsyncExitStack() as stack:
        drivers = [(await stack.enter_async_context(_ring([f"s{i}"], f"d{i}", i)))[0] for i in range(rings)]
        await asyncio.gather(*(_stream(d, base, 4) for d in drivers))
        runs = [_stream(drivers[i % rings], base, tokens) for i in range(streams)]
        return _steady_rate(await asyncio.gather(*runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of every setup; medians shown")
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
    # Rounds alternate the setups, so a slow spell of the machine does not land on one of them.
    measured: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    side_runs: dict[int, list[float]] = {n: [] for n in sizes if n > 1}
    for round_number in range(1, args.rounds + 1):
        for n in sizes:
            measured[n].append(asyncio.run(_measure(model_dir, n, args.tokens, args.streams)))
            if n > 1:
                side_runs[n].append(asyncio.run(_side_by_side(model_dir, n, args.tokens, args.streams)))
        rates = ", ".join(
            f"{n} node(s) {measured[n][-1]['single_tps']:.2f} / {measured[n][-1]['concurrent_tps']:.2f}"
            + (f" (side by side {side_runs[n][-1]:.2f})" if n > 1 else "")
            for n in sizes
        )
        print(f"round {round_number}, tok/s for 1 / {args.streams} streams: {rates}", flush=True)
    rows = {n: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for n, runs in measured.items()}
    side = {n: statistics.median(runs) for n, runs in side_runs.items()}
    one = rows[1]
    print(
        f"{args.preset} {args.dtype}, {args.tokens} tokens per stream, one core per node ({cores} cores),"
        f" median of {args.rounds} round(s)"
    )
    for n, rate in side.items():
        print(
            f"{n} one-node rings side by side, {args.streams} streams in all: {rate:.2f} tok/s,"
            f" {rate / one['concurrent_tps']:.2f}x one node (what {n} cores sharing this memory bus give)"
        )
    print(
        f"nodes | 1 stream tok/s | ratio | hop ms | RPC ms Rust / Python | bytes/token"
        f" | {args.streams} streams tok/s | ratio | of side by side"
    )
    for n, row in rows.items():
        # Per token, a ring of n > 1 nodes makes n hops; compute per token stays the same.
        hop_ms = (1 / row["single_tps"] - 1 / one["single_tps"]) * 1000 / n if n > 1 else 0.0
        print(
            f"{n:5} | {row['single_tps']:14.2f} | {row['single_tps'] / one['single_tps']:5.2f} | {hop_ms:6.3f} |"
            f" {row['rust_rtt_ms']:8.3f} / {row['python_rtt_ms']:6.3f} |"
            f" {row['bytes_per_token']:11.0f} | {row['concurrent_tps']:16.2f} |"
            f" {row['concurrent_tps'] / one['concurrent_tps']:5.2f} |"
            f" {row['concurrent_tps'] / side[n] if n in side else 1.0:15.2f}"
        )


if __name__ == "__main__":
    main()
