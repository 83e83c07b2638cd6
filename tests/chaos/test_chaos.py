"""Faults on real node processes (`python -m exo.main`, the candle engine, the tiny synthetic model, UDP discovery
on loopback): a peer killed, frozen, restarted or joining mid-generation, the API client hanging up, the model's
files damaged under a running node, a fresh ring right after a frozen one, and (between two network namespaces) a
partition that heals. Every scenario runs `CHAOS_RUNS` times (see conftest.py), each run faulting after a
different number of tokens; every wait is bounded."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from support.netns import CUTS, NamespacePair, NamespacesUnavailable, namespace_pair
from support.udp_nodes import NodeProcess, UdpRing, udp_ring

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
#: Enough tokens that a request is still running when a fault hits it (the tiny model's context is 2048).
LONG = 1500
#: Most seconds the API waits for a token; a fault must end a request well before it.
API_TIMEOUT = 30
#: The issue's bound on how long a request may take to fail once a peer is killed.
KILL_DEADLINE = 5.0
#: Most seconds a node keeps a request whose origin it cannot reach: the node's grace for a vanished origin (10 s
#: since the request's last step), with room for a busy CPU.
ORPHAN_LIMIT = 30.0


def faults_after(run: int) -> int:
    """How many streamed pieces of text arrive before run `run`'s fault: a different point each run."""
    return 2 + (run * 7) % 23


def request_body(model: Path, max_tokens: int, stream: bool) -> bytes:
    body = {"model": str(model), "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return json.dumps(body).encode()


def complete(node: NodeProcess, model: Path, max_tokens: int = 8, timeout: float = 60) -> tuple[int, dict[str, Any]]:
    """A non-streamed completion: its HTTP status and JSON body."""
    request = urllib.request.Request(
        f"{node.url}/v1/chat/completions",
        data=request_body(model, max_tokens, stream=False),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def answer(node: NodeProcess, model: Path) -> str:
    """The text of an 8-token completion, which must succeed."""
    status, body = complete(node, model)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


class Stream:
    """A streamed completion read event by event; `close` hangs up like a client that went away."""

    def __init__(self, node: NodeProcess, model: Path, max_tokens: int = LONG) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=API_TIMEOUT + 10)
        body = request_body(model, max_tokens, stream=True)
        self.connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()

    def events(self) -> Iterator[Any]:
        """Each event's JSON (the string `[DONE]` last), until the stream ends."""
        for raw in self.response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                yield data if data == "[DONE]" else json.loads(data)

    def read_text(self, pieces: int) -> None:
        """Reads until `pieces` pieces of text have arrived."""
        seen = 0
        for event in self.events():
            assert event != "[DONE]" and "error" not in event, f"the stream ended early: {event}"
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                seen += 1
                if seen >= pieces:
                    return

    def outcome(self) -> tuple[str, float]:
        """How the rest of the stream ends (`done`, or the error's message) and when it did."""
        for event in self.events():
            if event == "[DONE]":
                return "done", time.monotonic()
            if "error" in event:
                return event["error"]["message"], time.monotonic()
        return "closed without an error", time.monotonic()

    def close(self) -> None:
        self.connection.close()


@pytest.fixture(scope="module")
def solo_answer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """What a lone node answers: every ring must answer the same (greedy decoding)."""
    with udp_ring(tmp_path_factory.mktemp("solo"), model_dir) as ring:
        return answer(ring.start("solo", *API_ARGS), model_dir)


API_ARGS = ("--chatgpt-api-response-timeout", str(API_TIMEOUT))


@pytest.fixture
def ring(tmp_path: Path, model_dir: Path) -> Iterator[UdpRing]:
    with udp_ring(tmp_path, model_dir) as ring:
        yield ring


@pytest.fixture
def network() -> Iterator[NamespacePair]:
    """Two network namespaces joined by a link the test can cut; the test is skipped where they cannot be made."""
    with ExitStack() as stack:
        try:
            pair = stack.enter_context(namespace_pair())
        except NamespacesUnavailable as e:
            pytest.skip(f"cannot make network namespaces: {e}")
        yield pair


def two_nodes(ring: UdpRing) -> tuple[NodeProcess, NodeProcess]:
    a, b = ring.start("a", *API_ARGS), ring.start("b", *API_ARGS)
    ring.wait_for_ring([a, b])
    return a, b


def assert_spans_both(a: NodeProcess) -> None:
    """Node `a` runs one request, and it runs on nodes a and b."""
    running = a.requests()
    assert len(running) == 1 and sorted(running[0]["nodes"]) == ["a", "b"], running


def wait_until(condition: Any, what: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.2)


def test_peer_killed_mid_generation(
    ring: UdpRing, model_dir: Path, solo_answer: str, run: int, recovery: Callable[[float], None]
) -> None:
    a, b = two_nodes(ring)
    stream = Stream(a, model_dir)
    stream.read_text(faults_after(run))
    b.kill()
    killed_at = time.monotonic()
    error, ended_at = stream.outcome()
    assert "unavailable" in error or "stopped answering" in error, error
    recovery(ended_at - killed_at)
    assert ended_at - killed_at < KILL_DEADLINE, f"the request failed {ended_at - killed_at:.1f} s after the kill"
    ring.wait_for_ring([a])
    assert answer(a, model_dir) == solo_answer


def test_peer_frozen_then_resumed(
    ring: UdpRing, model_dir: Path, solo_answer: str, run: int, recovery: Callable[[float], None]
) -> None:
    a, b = two_nodes(ring)
    stream = Stream(a, model_dir)
    stream.read_text(faults_after(run))
    b.freeze()
    frozen_at = time.monotonic()
    error, ended_at = stream.outcome()
    assert error != "done" and "closed" not in error, error
    recovery(ended_at - frozen_at)
    assert ended_at - frozen_at < API_TIMEOUT, f"the request failed {ended_at - frozen_at:.1f} s after the freeze"
    b.resume()
    ring.wait_for_ring([a, b])
    assert answer(a, model_dir) == solo_answer
    assert answer(b, model_dir) == solo_answer


def test_peer_restarted_with_the_same_id(ring: UdpRing, model_dir: Path, solo_answer: str, run: int) -> None:
    a, b = two_nodes(ring)
    stream = Stream(a, model_dir)
    stream.read_text(faults_after(run))
    b.kill()
    assert stream.outcome()[0] != "done"
    b = ring.start("b", *API_ARGS)
    ring.wait_for_ring([a, b])
    assert answer(a, model_dir) == solo_answer
    assert answer(b, model_dir) == solo_answer


def test_node_joins_mid_generation(ring: UdpRing, model_dir: Path, solo_answer: str, run: int) -> None:
    a = ring.start("a", *API_ARGS)
    answers: list[tuple[int, Any]] = []
    joined = threading.Event()

    def ask_until_joined() -> None:
        # Requests back to back while b starts and joins, and one more after, so some run across the join.
        while not joined.is_set():
            answers.append(complete(a, model_dir, max_tokens=LONG // 4))
        answers.append(complete(a, model_dir, max_tokens=LONG // 4))

    asker = threading.Thread(target=ask_until_joined)
    asker.start()
    try:
        time.sleep(0.3 * (run % 3))
        b = ring.start("b", *API_ARGS)
        ring.wait_for_ring([a, b])
    finally:
        joined.set()
        asker.join(timeout=120)
    assert not asker.is_alive(), "a request never ended"
    failures = [body for status, body in answers if status != 200]
    assert not failures, failures
    assert len({body["choices"][0]["message"]["content"] for _, body in answers}) == 1
    assert answer(a, model_dir) == solo_answer


def test_client_hangs_up_mid_stream(
    ring: UdpRing, model_dir: Path, run: int, recovery: Callable[[float], None]
) -> None:
    a, b = two_nodes(ring)
    stream = Stream(a, model_dir)
    stream.read_text(faults_after(run))
    assert_spans_both(a)
    stream.close()
    closed_at = time.monotonic()
    for node in (a, b):
        wait_until(lambda n=node: n.requests() == [], f"no request left on node {node.node_id}", 10)
    recovery(time.monotonic() - closed_at)


def test_model_files_damaged_under_a_running_node(tmp_path: Path, model_dir: Path, solo_answer: str, run: int) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    with udp_ring(tmp_path / "nodes", model) as ring:
        a = ring.start("a", *API_ARGS)
        assert answer(a, model) == solo_answer
        weights = next(model.glob("*.safetensors"))
        if run % 2 == 0:
            with weights.open("r+b") as f:
                f.truncate(weights.stat().st_size // 2)
        else:
            shutil.rmtree(model)
        # The loaded model may go on answering; whatever it does, the answer is whole or a clear error.
        status, body = complete(a, model)
        assert status == 200 or body["error"]["message"], body
        assert a.alive(), a.output()
        # A damaged model the node has not loaded yet is refused with a clear error.
        damaged = tmp_path / "damaged"
        shutil.copytree(model_dir, damaged)
        damaged_weights = next(damaged.glob("*.safetensors"))
        with damaged_weights.open("r+b") as f:
            f.truncate(damaged_weights.stat().st_size // (2 + run))
        status, body = complete(a, damaged)
        assert 400 <= status < 600, body
        assert "safetensors" in body["error"]["message"] or damaged.name in body["error"]["message"], body
        assert a.alive(), a.output()
        assert answer(a, model_dir) == solo_answer


def test_fresh_ring_right_after_a_frozen_one(
    ring: UdpRing, model_dir: Path, solo_answer: str, run: int, recovery: Callable[[float], None]
) -> None:
    """The issue's sequence: a ring whose second node is frozen mid-stream, then resumed and killed together with
    the first; right after, two new nodes on fresh ports form a ring and their first request must be answered."""
    a, b = two_nodes(ring)
    stream = Stream(a, model_dir)
    stream.read_text(faults_after(run))
    b.freeze()
    time.sleep(0.5 * (run % 3))
    b.resume()
    a.kill()
    b.kill()
    stream.close()
    c, d = ring.start("c", *API_ARGS), ring.start("d", *API_ARGS)
    ring.wait_for_ring([c, d])
    asked_at = time.monotonic()
    status, body = complete(c, model_dir, timeout=API_TIMEOUT + 10)
    recovery(time.monotonic() - asked_at)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == solo_answer


def test_partition_healed(
    network: NamespacePair,
    ring: UdpRing,
    model_dir: Path,
    solo_answer: str,
    run: int,
    recovery: Callable[[float], None],
    reformed: Callable[[float], None],
) -> None:
    """Node a in one network namespace and b in another, joined by a veth pair that is cut mid-generation and
    joined again. The cut alternates by run between the two ways a link fails (see `support.netns.CUTS`): every
    packet dropped at both ends, so that neither host is told and connections go silent, as when a switch fails;
    and both ends taken down, so that each host knows at once, as when a cable is pulled. Half the partitions heal
    as soon as each side runs alone, half once b has ended a's request on its own. The test reaches each node's
    API through a relay into its namespace, which the cut does not touch."""
    a = ring.start("a", *API_ARGS, host=network.a)
    b = ring.start("b", *API_ARGS, host=network.b)
    ring.wait_for_ring([a, b])
    stream = Stream(a, model_dir)
    stream.read_text(faults_after(run))
    assert_spans_both(a)
    network.cut(sorted(CUTS)[run % len(CUTS)])
    cut_at = time.monotonic()
    error, ended_at = stream.outcome()
    assert "unavailable" in error, error
    recovery(ended_at - cut_at)
    assert ended_at - cut_at < API_TIMEOUT, f"the request failed {ended_at - cut_at:.1f} s after the cut"
    # Each side goes on as a ring of one.
    for node in (a, b):
        ring.wait_for_ring([node])
        assert answer(node, model_dir) == solo_answer
    if run % 4 >= 2:
        # A partition that outlasts b's grace for a vanished origin: b ends a's request on its own.
        wait_until(lambda: b.requests() == [], "b ending the request of the unreachable a", ORPHAN_LIMIT)
    network.heal()
    healed_at = time.monotonic()
    ring.wait_for_ring([a, b])
    reformed(time.monotonic() - healed_at)
    spanning = Stream(a, model_dir)
    spanning.read_text(1)
    assert_spans_both(a)
    spanning.close()
    assert answer(a, model_dir) == solo_answer
    for node in (a, b):
        wait_until(lambda n=node: n.requests() == [], f"no request left on node {node.node_id}", 10)
        assert node.alive(), node.output()
