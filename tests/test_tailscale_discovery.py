"""Tailscale discovery against a fake devices API on 127.0.0.1: device list, posture attributes, filters."""

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from exo.errors import DiscoveryError
from exo.networking.tailscale.tailscale_discovery import TailscaleDiscovery
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from support.discovery_fakes import WAIT, FakePeerFactory, eventually, peer_ids

API_KEY = "tskey-test"
CAPS = DeviceCapabilities("Linux Box (Test)", "Test Chip", 4096, DeviceFlops(1.5, 3.0, 6.0))


def seen(seconds_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def exo_attributes(node_id: str, port: int) -> dict[str, Any]:
    """Attributes as classic's `update_device_attributes` writes them."""
    return {
        "custom:exo_node_id": node_id.replace("-", "_"),
        "custom:exo_node_port": port,
        "custom:exo_device_capability_chip": "Peer_Chip",
        "custom:exo_device_capability_model": "Peer_Box",
        "custom:exo_device_capability_memory": "8192",
        "custom:exo_device_capability_flops_fp16": "2.0",
        "custom:exo_device_capability_flops_fp32": "1.0",
        "custom:exo_device_capability_flops_int8": "4.0",
    }


class FakeTailscale:
    """Tailscale's devices and attributes API, in memory; records every attribute written."""

    def __init__(self) -> None:
        self.devices: list[dict[str, Any]] = []
        self.attributes: dict[str, dict[str, Any]] = {}
        self.unauthorized = 0
        self.lock = threading.Lock()

    def add_device(self, device_id: str, name: str, address: str, seconds_ago: float, **attrs: Any) -> None:
        with self.lock:
            self.devices.append({"id": device_id, "name": name, "addresses": [address, "fd7a::1"], "seen": seconds_ago})
            self.attributes[device_id] = dict(attrs)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {API_KEY}":
                    return True
                with api.lock:
                    api.unauthorized += 1
                self.reply(401, {"message": "unauthorized"})
                return False

            def do_GET(self) -> None:
                if not self.authorized():
                    return
                parts = self.path.strip("/").split("/")
                with api.lock:
                    if parts[:3] == ["api", "v2", "tailnet"] and parts[4:] == ["devices"]:
                        devices = [
                            {"id": d["id"], "name": d["name"], "addresses": d["addresses"], "lastSeen": seen(d["seen"])}
                            for d in api.devices
                        ]
                        return self.reply(200, {"devices": devices})
                    if parts[:3] == ["api", "v2", "device"] and parts[4:] == ["attributes"]:
                        return self.reply(200, {"attributes": api.attributes.get(parts[3], {})})
                self.reply(404, {"message": "not found"})

            def do_POST(self) -> None:
                if not self.authorized():
                    return
                parts = self.path.strip("/").split("/")
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if parts[:3] == ["api", "v2", "device"] and parts[4:5] == ["attributes"] and len(parts) == 6:
                    with api.lock:
                        api.attributes.setdefault(parts[3], {})[parts[5]] = body["value"]
                    return self.reply(200, {})
                self.reply(404, {"message": "not found"})

        return Handler


class QuietServer(ThreadingHTTPServer):
    """Leaves connections the client dropped (the discovery stopping mid-request) unreported."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None


@pytest.fixture
def fake_api() -> Iterator[tuple[FakeTailscale, str]]:
    api = FakeTailscale()
    server = QuietServer(("127.0.0.1", 0), api.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def discovery_for(base: str, factory: FakePeerFactory, **kwargs: Any) -> TailscaleDiscovery:
    return TailscaleDiscovery(
        "node-1",
        50051,
        factory,
        discovery_interval=0.2,
        update_interval=0.2,
        device_capabilities=CAPS,
        tailscale_api_key=API_KEY,
        tailnet="example.com",
        api_base=base,
        device_id="dev-self",
        **kwargs,
    )


async def test_finds_active_exo_devices_and_publishes_its_own_attributes(fake_api) -> None:
    api, base = fake_api
    api.add_device("dev-self", "self.example.ts.net", "100.64.0.1", 1, **exo_attributes("node-1", 50051))
    api.add_device("dev-2", "peer.example.ts.net", "100.64.0.2", 2, **exo_attributes("node-2", 50052))
    api.add_device("dev-3", "stale.example.ts.net", "100.64.0.3", 3600, **exo_attributes("node-3", 50053))
    api.add_device("dev-4", "laptop.example.ts.net", "100.64.0.4", 1)
    factory = FakePeerFactory()
    discovery = discovery_for(base, factory)
    await discovery.start()
    try:
        peers = await asyncio.wait_for(discovery.discover_peers(1), WAIT)
        assert [(p.id(), p.addr(), p.description()) for p in peers] == [("node-2", "100.64.0.2:50052", "TS")]
        caps = peers[0].device_capabilities()
        assert (caps.model, caps.chip, caps.memory, caps.flops.fp16) == ("Peer Box", "Peer Chip", 8192, 2.0)

        expected = {
            "custom:exo_node_id": "node_1",
            "custom:exo_node_port": "50051",
            "custom:exo_device_capability_model": "Linux_Box__Test_",
            "custom:exo_device_capability_memory": "4096",
            "custom:exo_device_capability_flops_fp32": "1.5",
        }

        async def published() -> bool:
            # Attributes are written one request at a time: wait for every one of them.
            with api.lock:
                own = api.attributes["dev-self"]
                return all(own.get(name) == value for name, value in expected.items())

        await eventually(published, f"own posture attributes written: {expected}")
        await asyncio.sleep(0.5)
        assert peer_ids(await discovery.discover_peers()) == ["node-2"]
        assert api.unauthorized == 0
    finally:
        await discovery.stop()


async def test_allowed_node_ids_and_health_checks_filter_peers(fake_api) -> None:
    api, base = fake_api
    api.add_device("dev-2", "two.example.ts.net", "100.64.0.2", 1, **exo_attributes("node-2", 50052))
    api.add_device("dev-5", "five.example.ts.net", "100.64.0.5", 1, **exo_attributes("node-5", 50055))
    factory = FakePeerFactory()
    discovery = discovery_for(base, factory, allowed_node_ids=["node-5"])
    await discovery.start()
    try:
        peers = await asyncio.wait_for(discovery.discover_peers(1), WAIT)
        assert peer_ids(peers) == ["node-5"]
        assert {p.id() for p in factory.made} == {"node-5"}

        for peer in factory.made:
            peer.healthy = False
        factory.healthy = False

        async def dropped() -> bool:
            return await discovery.discover_peers() == []

        await eventually(dropped, "the unhealthy peer was dropped")
    finally:
        await discovery.stop()


async def test_a_missing_api_key_is_a_clear_error(fake_api, monkeypatch: pytest.MonkeyPatch) -> None:
    _, base = fake_api
    monkeypatch.delenv("TAILSCALE_API_KEY", raising=False)
    discovery = TailscaleDiscovery("node-1", 50051, FakePeerFactory(), api_base=base, device_id="dev-self")
    with pytest.raises(DiscoveryError, match="TAILSCALE_API_KEY"):
        await discovery.start()


async def test_the_api_key_and_base_can_come_from_the_environment(fake_api, monkeypatch: pytest.MonkeyPatch) -> None:
    api, base = fake_api
    api.add_device("dev-2", "two.example.ts.net", "100.64.0.2", 1, **exo_attributes("node-2", 50052))
    monkeypatch.setenv("TAILSCALE_API_KEY", API_KEY)
    monkeypatch.setenv("EXO_TAILSCALE_API_BASE", base)
    discovery = TailscaleDiscovery(
        "node-1", 50051, FakePeerFactory(), discovery_interval=0.2, device_capabilities=CAPS, device_id="dev-self"
    )
    assert (discovery.discovery_interval, discovery.update_interval, discovery.discovery_timeout) == (0.2, 15.0, 30.0)
    await discovery.start()
    try:
        assert peer_ids(await asyncio.wait_for(discovery.discover_peers(1), WAIT)) == ["node-2"]
    finally:
        await discovery.stop()
