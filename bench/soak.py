"""Soak benchmark: many API clients against one node (`python -m exo.main`, the candle engine, the tiny
synthetic model) for a fixed time, mixing streamed and whole completions, clients that hang up mid-stream and
malformed requests.

    python bench/soak.py [--clients 16] [--seconds 120] [--sample-every 5] [--seed 0] [--plot soak.png]

The issue's run is `--clients 64 --seconds 600`. Before the load, each prompt of a small set is answered alone
(seeded sampling, see `body`) at each of a few token limits; under load every completed answer must equal its solo
answer: one that differs counts as mixed, one that fails or never comes as lost. Every malformed request must get
a 4xx. Hang-ups close the connection after a few chunks; once the load ends, the node must list no running request
(`GET /v1/requests`). The node's resident memory and open file descriptors are sampled from /proc every
`--sample-every` seconds and printed as a series (and plotted with `--plot`, when matplotlib is installed), with
latency p50/p99 of the completed answers. Exits non-zero when anything was lost, mixed or wrongly answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from exo.helpers import find_available_port
from exo.testing.synth import write_model

PROMPTS = [
    "Who are you?",
    "Tell me about the sea.",
    "Count to ten.",
    "What is a ring of nodes?",
    "Write a haiku about rust.",
    "Name three colours.",
    "Why is the sky blue?",
    "Say something kind.",
]
TOKEN_LIMITS = (4, 16, 48)
#: Bodies a client must be refused with a 4xx for: not JSON, no messages, a bad field, a bad message.
MALFORMED = [
    b"{not json",
    b'{"model": "m"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}',
    b'{"messages": [{"role": "wizard", "content": 7}]}',
    b"[]",
]
#: Most seconds one answer may take under load before it counts as lost.
ANSWER_LIMIT = 120


@dataclass
class Tally:
    """What the clients saw."""

    answers: int = 0
    lost: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    hang_ups: int = 0
    malformed: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def body(prompt: str, max_tokens: int, stream: bool) -> dict[str, object]:
    """A completion request; sampled with a seed fixed per prompt, so answers differ between prompts (greedy
    decoding of the random tiny model answers most prompts alike) and each is reproducible."""
    messages = [{"role": "user", "content": prompt}]
    seed = PROMPTS.index(prompt)
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": stream}


async def whole(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> str:
    async with session.post(f"{url}/v1/chat/completions", json=body(prompt, max_tokens, False)) as response:
        reply = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {reply}")
        return reply["choices"][0]["message"]["content"]


async def streamed(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, hang_up: int = 0) -> str:
    """The streamed text; with `hang_up`, closes the connection after that many chunks and returns ''."""
    pieces: list[str] = []
    async with session.post(f"{url}/v1/chat/completions", json=body(prompt, max_tokens, True)) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event["choices"]:
                pieces.append(event["choices"][0]["delta"].get("content") or "")
            if hang_up and len(pieces) >= hang_up:
                response.close()
                return ""
    return "".join(pieces)


async def client(url: str, index: int, seed: int, until: float, solo: dict[tuple[str, int], str], tally: Tally):
    """One user: until `until`, a random mix of the four kinds of request."""
    rng = random.Random(seed * 1000 + index)
    timeout = aiohttp.ClientTimeout(total=ANSWER_LIMIT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            prompt, max_tokens = rng.choice(PROMPTS), rng.choice(TOKEN_LIMITS)
            kind = rng.random()
            started = time.monotonic()
            try:
                if kind < 0.15:
                    async with session.post(f"{url}/v1/chat/completions", data=rng.choice(MALFORMED)) as response:
                        tally.malformed[response.status] += 1
                    continue
                if kind < 0.35:
                    await streamed(session, url, prompt, max(max_tokens, 16), hang_up=rng.randint(1, 3))
                    tally.hang_ups += 1
                    continue
                text = await (streamed if kind < 0.7 else whole)(session, url, prompt, max_tokens)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as e:
                tally.lost.append(f"{prompt!r}/{max_tokens}: {type(e).__name__}: {e}")
                continue
            tally.answers += 1
            tally.latencies.append(time.monotonic() - started)
            if text != solo[(prompt, max_tokens)]:
                tally.mixed.append(f"{prompt!r}/{max_tokens}: {text!r} != {solo[(prompt, max_tokens)]!r}")


def usage(pid: int) -> tuple[float, int]:
    """A process's resident memory (MB) and open file descriptors, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def sample(pid: int, every: float, until: float, series: list[tuple[float, float, int]]) -> None:
    start = time.monotonic()
    while True:
        series.append((time.monotonic() - start, *usage(pid)))
        if time.monotonic() >= until:
            return
        await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=3) as response:
        return json.loads(response.read())


def start_node(model: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """One node serving the tiny model on loopback, alone (UDP discovery on a port of its own)."""
    api_port, udp_port = find_available_port("127.0.0.1"), find_available_port("127.0.0.1")
    command = [
        sys.executable, "-m", "exo.main", "--node-id", "soak", "--node-host", "127.0.0.1",
        "--chatgpt-api-port", str(api_port), "--listen-port", str(udp_port), "--broadcast-port", str(udp_port),
        "--interface-type-filter", "Loopback", "--inference-engine", "candle", "--default-model", str(model),
        "--disable-tui", "--chatgpt-api-response-timeout", str(ANSWER_LIMIT),
    ]  # fmt: skip
    env = {**os.environ, "EXO_HOME": str(workdir / "exo-home")}
    log = (workdir / "node.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the node exited:\n{(workdir / 'node.log').read_text()}")
        if time.monotonic() > deadline:
            raise SystemExit("the node's API never answered")
        try:
            get_json(f"{url}/healthcheck")
            return process, url
        except OSError:
            time.sleep(0.3)


async def solo_answers(url: str) -> dict[tuple[str, int], str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWER_LIMIT)) as session:
        return {(p, n): await whole(session, url, p, n) for p in PROMPTS for n in TOKEN_LIMITS}


async def leftover_requests(url: str, limit: float = 10) -> list[object]:
    """The requests the node still runs once the load is over, after `limit` seconds to settle."""
    deadline = time.monotonic() + limit
    while True:
        running = get_json(f"{url}/v1/requests")["requests"]  # type: ignore[index]
        if not running or time.monotonic() > deadline:
            return running
        await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace, url: str, pid: int) -> bool:
    solo = await solo_answers(url)
    print(f"solo answers: {len(set(solo.values()))} distinct of {len(solo)}")
    tally, series = Tally(), []
    until = time.monotonic() + args.seconds
    sampler = asyncio.create_task(sample(pid, args.sample_every, until, series))
    await asyncio.gather(*(client(url, i, args.seed, until, solo, tally) for i in range(args.clients)))
    await sampler
    leftover = await leftover_requests(url)
    report(args, tally, series, leftover)
    wrong = sum(n for status, n in tally.malformed.items() if not 400 <= status < 500)
    return not (tally.lost or tally.mixed or wrong or leftover)


def report(args: argparse.Namespace, tally: Tally, series: list[tuple[float, float, int]], leftover: list) -> None:
    print(f"{args.clients} clients for {args.seconds} s against one node (tiny-llama, candle)")
    print(f"answers {tally.answers}, lost {len(tally.lost)}, mixed {len(tally.mixed)}, hang-ups {tally.hang_ups}")
    print("malformed requests by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.malformed.items())))
    p50, p99 = percentile(tally.latencies, 0.5), percentile(tally.latencies, 0.99)
    print(f"latency of completed answers: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(f"requests still running after the load: {len(leftover)}")
    print("   t s   RSS MB   fds")
    for t, rss, fds in series:
        print(f"{t:6.0f} {rss:8.1f} {fds:5d}")
    for line in (tally.lost + tally.mixed)[:10]:
        print("  " + line)
    if args.plot:
        plot(series, args.plot)


def plot(series: list[tuple[float, float, int]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rss, fds) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    times = [t for t, _, _ in series]
    rss.plot(times, [r for _, r, _ in series])
    rss.set_ylabel("RSS MB")
    fds.plot(times, [f for _, _, f in series])
    fds.set_ylabel("open fds")
    fds.set_xlabel("seconds")
    figure.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent API clients")
    parser.add_argument("--seconds", type=float, default=120, help="how long the load lasts")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between RSS/fd samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    parser.add_argument("--plot", type=str, default=None, help="write the RSS/fd series as this PNG")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        model = write_model("tiny-llama", workdir / "tiny-llama")
        process, url = start_node(model, workdir)
        try:
            ok = asyncio.run(soak(args, url, process.pid))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
