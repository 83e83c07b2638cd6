"""Two network namespaces joined by a veth pair, so a test can cut the network between two nodes and heal it.

Both namespaces belong to a user namespace of their own (`unshare --user --map-root-user --net`, as in
test_udp_discovery_netns.py), so no root is needed and no packet leaves them. Each is held open by a `sleep`
process, and commands run in one through `nsenter` on its holder. The test's own namespace has no link to them:
it reaches a server in one through a relay (`netns_relay.py`) listening on the test's loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.udp_nodes import Host

TOOLS = ("unshare", "nsenter", "ip", "tc")
RELAY = Path(__file__).with_name("netns_relay.py")
#: How long a namespace's holder may take to start, and a command in a namespace to run.
COMMAND_LIMIT = 10.0
#: How long a holder keeps its namespace if nothing kills it (a test process killed before its clean-up).
HOLD_SECONDS = 3600
#: How `cut` stops the traffic, and how `heal` lets it through again, on one end of the link.
CUTS = {
    # Every packet the end sends is dropped (a queue of length 0): neither host is told, as when a switch
    # further along the path fails, and open connections just go silent.
    "dropped": ("tc qdisc add dev {0} root pfifo limit 0", "tc qdisc del dev {0} root"),
    # The end is down, as when its cable is pulled: each host knows, and new connections fail at once with
    # "network unreachable". IPv4 addresses stay on a device that is down; its routes come back with it.
    "down": ("ip link set {0} down", "ip link set {0} up"),
}


class NamespacesUnavailable(RuntimeError):
    """This machine cannot make the namespaces: a tool is missing, or user namespaces are turned off."""


class Namespace(Host):
    """One side of the pair: a network namespace that holds one end of the veth pair."""

    def __init__(self, pair: NamespacePair, holder: subprocess.Popen[bytes], interface: str, address: str) -> None:
        super().__init__(address=address, interface_type="Ethernet")
        self.pair = pair
        self.holder = holder
        self.interface = interface

    def command(self, argv: list[str]) -> list[str]:
        return ["nsenter", "--target", str(self.holder.pid), "--user", "--net", *argv]

    def run(self, script: str) -> None:
        """Runs a shell script here; a failure raises `CalledProcessError` with its output."""
        subprocess.run(self.command(["sh", "-ec", script]), check=True, capture_output=True, timeout=COMMAND_LIMIT)

    def reach(self, port: int) -> int:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            fd = listener.fileno()
            relay = subprocess.Popen(self.command([sys.executable, str(RELAY), str(fd), str(port)]), pass_fds=(fd,))
            self.pair.processes.append(relay)
            return listener.getsockname()[1]


class NamespacePair:
    """Namespaces `a` (eth7, 10.77.0.1) and `b` (eth8, 10.77.0.2), each end of their link up and addressed."""

    def __init__(self, processes: list[subprocess.Popen[bytes]]) -> None:
        #: Where each process started here (holders and relays) is recorded, for the owner to kill.
        self.processes = processes
        missing = [tool for tool in TOOLS if not shutil.which(tool)]
        if missing:
            raise NamespacesUnavailable(f"{', '.join(missing)} not found (util-linux and iproute2 provide them)")
        self.a = Namespace(self, self._hold(["unshare", "--user", "--map-root-user", "--net"]), "eth7", "10.77.0.1")
        self.b = Namespace(self, self._hold(self.a.command(["unshare", "--net"])), "eth8", "10.77.0.2")
        self._healing: str | None = None
        try:
            self.a.run(f"ip link add eth7 type veth peer name eth8 netns {self.b.holder.pid}")
            for side in (self.a, self.b):
                side.run(f"ip link set lo up; ip addr add {side.address}/24 dev {side.interface}")
                side.run(f"ip link set {side.interface} up")
        except subprocess.CalledProcessError as e:
            raise NamespacesUnavailable(f"{e.cmd[-1]!r} failed: {e.stderr.decode().strip()}") from e

    def cut(self, how: str) -> None:
        """Stops all traffic between the namespaces, both ways; `how` is a key of `CUTS`."""
        cut, self._healing = CUTS[how]
        for side in (self.a, self.b):
            side.run(cut.format(side.interface))

    def heal(self) -> None:
        """Lets the traffic through again after `cut`."""
        assert self._healing is not None, "heal without a cut"
        for side in (self.a, self.b):
            side.run(self._healing.format(side.interface))
        self._healing = None

    def _hold(self, unshare: list[str]) -> subprocess.Popen[bytes]:
        """A `sleep` process in the namespace that `unshare` makes, once it is there."""
        holder = subprocess.Popen([*unshare, "sleep", str(HOLD_SECONDS)], stderr=subprocess.PIPE)
        self.processes.append(holder)
        deadline = time.monotonic() + COMMAND_LIMIT
        # `unshare` execs `sleep` once the namespaces are made (and the user namespace's id maps written).
        while Path(f"/proc/{holder.pid}/comm").read_text().strip() != "sleep":
            if holder.poll() is not None:
                assert holder.stderr is not None
                raise NamespacesUnavailable(f"{' '.join(unshare)}: {holder.stderr.read().decode().strip()}")
            if time.monotonic() > deadline:
                raise NamespacesUnavailable(f"{' '.join(unshare)} made no namespace in {COMMAND_LIMIT:.0f} s")
            time.sleep(0.02)
        return holder


@contextmanager
def namespace_pair() -> Iterator[NamespacePair]:
    """A `NamespacePair` whose relays and holders are all killed when the block ends (or when making it fails); the
    namespaces and their link go with their last process."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        yield NamespacePair(processes)
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=COMMAND_LIMIT)
