"""UDP discovery between two network namespaces joined by a veth pair: the broadcast path off loopback.

The test makes its own user and network namespaces with `unshare` (util-linux), so nothing leaves them.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

PEER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from exo.networking.udp.udp_discovery import UDPDiscovery
    from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

    class Peer:
        def __init__(self, peer_id, address, description, caps):
            self.values = (peer_id, address, description, caps)
        def id(self): return self.values[0]
        def addr(self): return self.values[1]
        def description(self): return self.values[2]
        def device_capabilities(self): return self.values[3]
        async def health_check(self): return True
        async def send_tensor(self, *args): raise ConnectionError("fake")

    async def main(node_id, port, other, out):
        caps = DeviceCapabilities("Netns Box", "Netns Chip", 1, DeviceFlops(1.0, 1.0, 1.0))
        discovery = UDPDiscovery(node_id, port, 5678, 5678, Peer, broadcast_interval=0.2, device_capabilities=caps)
        await discovery.start()
        peers = await asyncio.wait_for(discovery.discover_peers(1), 60)
        found = [(p.id(), p.addr(), p.description()) for p in peers]
        (out / f"{node_id}.json").write_text(json.dumps(found))
        # Keep announcing until the other side has found this node too.
        while not (out / f"{other}.json").exists():
            await asyncio.sleep(0.1)
        await discovery.stop()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])))
    # Leave without finalizing the interpreter: a tokio thread may still be dropping the last
    # awaitable's Python objects (pyo3-async-runtimes' set_result), which races finalization.
    os._exit(0)
    """
)

NAMESPACES = textwrap.dedent(
    """
    set -eu
    holder=; other=
    trap 'kill $holder $other 2>/dev/null || true' EXIT
    ip link set lo up
    unshare --net sleep 120 &
    holder=$!
    while [ "$(readlink /proc/$holder/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.05; done
    ip link add eth7 type veth peer name eth8
    ip link set eth8 netns "$holder"
    ip addr add 10.77.0.1/24 dev eth7
    ip link set eth7 up
    nsenter --target "$holder" --net sh -c 'ip link set lo up; ip addr add 10.77.0.2/24 dev eth8; ip link set eth8 up'
    nsenter --target "$holder" --net "$PYTHON" "$PEER" b 50062 a "$OUT" &
    other=$!
    "$PYTHON" "$PEER" a 50061 b "$OUT"
    wait "$other"
    """
)


def test_udp_discovery_across_a_veth_pair(tmp_path: Path) -> None:
    assert shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip"), "needs util-linux and iproute2"
    peer = tmp_path / "peer.py"
    peer.write_text(PEER)
    env = {"PYTHON": sys.executable, "PEER": str(peer), "OUT": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", NAMESPACES],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found_by_a = json.loads((tmp_path / "a.json").read_text())
    found_by_b = json.loads((tmp_path / "b.json").read_text())
    assert found_by_a == [["b", "10.77.0.2:50062", "Ethernet (eth8)"]]
    assert found_by_b == [["a", "10.77.0.1:50061", "Ethernet (eth7)"]]
