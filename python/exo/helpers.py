"""Small shared utilities: debug levels, async callbacks, node ids, ports, network interfaces.

Mirrors the helper API of exo classic (``exo/helpers.py``) so that callers written against it keep working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psutil

logger = logging.getLogger(__name__)


def _env_int(name: str, default: int = 0) -> int:
    """Integer value of environment variable ``name``; ``default`` when unset, empty or not an integer."""
    raw = os.getenv(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw.strip())
    except ValueError:
        return default


DEBUG: int = _env_int("DEBUG")
DEBUG_DISCOVERY: int = _env_int("DEBUG_DISCOVERY")
VERSION: str = "0.0.1"

exo_text = r"""
  _____  _____  
 / _ \ \/ / _ \ 
|  __/>  < (_) |
 \___/_/\_\___/ 
    """  # noqa: W291

# Worker threads for blocking subprocess calls (e.g. `system_profiler`), shared so they are not spawned per call.
subprocess_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="subprocess_worker")

NODE_ID_FILENAME = ".exo_node_id"
USED_PORTS_FILENAME = "exo_used_ports"
_USED_PORTS_KEPT = 20


# ---------------------------------------------------------------------------
# System / presentation helpers
# ---------------------------------------------------------------------------


def get_system_info() -> str:
    """A coarse description of the host platform, as exo classic reports it."""
    if psutil.MACOS:
        machine = platform.machine()
        if machine == "arm64":
            return "Apple Silicon Mac"
        if machine in ("x86_64", "i386"):
            return "Intel Mac"
        return "Unknown Mac architecture"
    if psutil.LINUX:
        return "Linux"
    return "Non-Mac, non-Linux system"


def print_exo() -> None:
    print(exo_text)


def print_yellow_exo() -> None:
    """Print the exo banner in yellow to stdout."""
    yellow = "\033[93m"
    reset = "\033[0m"
    print(f"{yellow}{exo_text}{reset}")


def terminal_link(uri: str, label: str | None = None) -> str:
    """An OSC 8 terminal hyperlink to ``uri`` showing ``label`` (the uri itself by default)."""
    if label is None:
        label = uri
    return f"\033]8;;{uri}\033\\{label}\033]8;;\033\\"


def _pretty_units(value: float, suffix: str) -> str:
    if value < 1024:
        return f"{value} B{suffix}"
    for exponent, unit in ((2, "KB"), (3, "MB"), (4, "GB")):
        if value < 1024**exponent:
            return f"{value / 1024 ** (exponent - 1):.2f} {unit}{suffix}"
    return f"{value / 1024**4:.2f} TB{suffix}"


def pretty_print_bytes(size_in_bytes: float) -> str:
    """Human readable size in binary units, e.g. ``1536 -> "1.50 KB"``."""
    return _pretty_units(size_in_bytes, "")


def pretty_print_bytes_per_second(bytes_per_second: float) -> str:
    """Human readable throughput in binary units, e.g. ``1536 -> "1.50 KB/s"``."""
    return _pretty_units(bytes_per_second, "/s")


def is_frozen() -> bool:
    """Whether running from a packaged executable rather than a Python install."""
    return bool(
        getattr(sys, "frozen", False)
        or os.path.basename(sys.executable) == "exo"
        or "Contents/MacOS" in str(os.path.dirname(sys.executable))
        or "__nuitka__" in globals()
        or getattr(sys, "__compiled__", False)
    )


def get_exo_home() -> Path:
    """``~/Documents/Exo`` (``%USERPROFILE%\\Documents\\Exo`` on Windows), created if missing."""
    if psutil.WINDOWS:
        docs_folder = Path(os.environ["USERPROFILE"]) / "Documents"
    else:
        docs_folder = Path.home() / "Documents"
    exo_folder = docs_folder / "Exo"
    exo_folder.mkdir(parents=True, exist_ok=True)
    return exo_folder


def get_exo_images_dir() -> Path:
    """``<exo home>/Images``, created if missing."""
    images_dir = get_exo_home() / "Images"
    images_dir.mkdir(parents=True, exist_ok=True)
    return images_dir


# ---------------------------------------------------------------------------
# Async callbacks
# ---------------------------------------------------------------------------

T = TypeVar("T")
K = TypeVar("K")


class AsyncCallback(Generic[T]):
    """Holds the latest result set on it, calls observers on each ``set`` and wakes ``wait``-ers.

    ``set`` may be called from any thread, with or without a running event loop: observers run synchronously in
    the caller's thread, and each waiter receives the result on its own event loop.
    """

    def __init__(self) -> None:
        self.result: tuple[T, ...] | None = None
        self.observers: list[Callable[..., None]] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[T, ...]]]] = []
        self._lock = threading.Lock()

    async def wait(self, check_condition: Callable[..., bool], timeout: float | None = None) -> tuple[T, ...]:
        """Return the args of the current or next result for which ``check_condition(*args)`` is true.

        Raises ``asyncio.TimeoutError`` when none arrives within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[T, ...]] = asyncio.Queue()
        waiter = (loop, queue)
        with self._lock:
            current = self.result
            self._waiters.append(waiter)
        try:
            if current is not None and check_condition(*current):
                return current
            return await asyncio.wait_for(self._next_match(queue, check_condition), timeout)
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    @staticmethod
    async def _next_match(queue: asyncio.Queue[tuple[T, ...]], check_condition: Callable[..., bool]) -> tuple[T, ...]:
        while True:
            args = await queue.get()
            if check_condition(*args):
                return args

    def on_next(self, callback: Callable[..., None]) -> None:
        """Call ``callback(*args)`` on every subsequent ``set``."""
        self.observers.append(callback)

    def set(self, *args: T) -> None:
        """Record ``args`` as the result, call the observers, then hand the result to every waiter."""
        with self._lock:
            self.result = args
            waiters = list(self._waiters)
        try:
            for observer in list(self.observers):
                observer(*args)
        finally:
            self._deliver(waiters, args)

    @staticmethod
    def _deliver(
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[T, ...]]]], args: tuple[T, ...]
    ) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, queue in waiters:
            if loop is running:
                queue.put_nowait(args)
                continue
            try:
                loop.call_soon_threadsafe(queue.put_nowait, args)
            except RuntimeError:
                # The waiter's loop has been closed; nobody is left to wake.
                logger.debug("AsyncCallback: dropping result for a waiter whose event loop is closed")


class AsyncCallbackSystem(Generic[K, T]):
    """Named ``AsyncCallback``s."""

    def __init__(self) -> None:
        self.callbacks: dict[K, AsyncCallback[T]] = {}

    def register(self, name: K) -> AsyncCallback[T]:
        """The callback registered under ``name``, created on first use."""
        callback = self.callbacks.get(name)
        if callback is None:
            callback = AsyncCallback[T]()
            self.callbacks[name] = callback
        return callback

    def deregister(self, name: K) -> None:
        self.callbacks.pop(name, None)

    def trigger(self, name: K, *args: T) -> None:
        """Set ``args`` on the callback named ``name``, if registered."""
        callback = self.callbacks.get(name)
        if callback is not None:
            callback.set(*args)

    def trigger_all(self, *args: T) -> None:
        """Set ``args`` on every registered callback."""
        for callback in list(self.callbacks.values()):
            callback.set(*args)


# ---------------------------------------------------------------------------
# Prefix lookup
# ---------------------------------------------------------------------------

PK = TypeVar("PK", bound=str)
V = TypeVar("V")


class PrefixDict(Generic[PK, V]):
    """A mapping searched by which keys are prefixes of a given string."""

    def __init__(self) -> None:
        self.items: dict[PK, V] = {}

    def add(self, key: PK, value: V) -> None:
        self.items[key] = value

    def find_prefix(self, argument: str) -> list[tuple[PK, V]]:
        """All ``(key, value)`` pairs whose key is a prefix of ``argument``."""
        return [(key, value) for key, value in self.items.items() if argument.startswith(key)]

    def find_longest_prefix(self, argument: str) -> tuple[PK, V] | None:
        """The pair with the longest key that prefixes ``argument``, or None."""
        matches = self.find_prefix(argument)
        if not matches:
            return None
        return max(matches, key=lambda item: len(item[0]))


# ---------------------------------------------------------------------------
# Node identity and ports
# ---------------------------------------------------------------------------


def is_valid_uuid(val: object) -> bool:
    try:
        uuid.UUID(str(val))
    except ValueError:
        return False
    return True


def get_or_create_node_id() -> str:
    """This machine's node id, persisted in ``<tempdir>/.exo_node_id``.

    An unreadable-as-UUID file is replaced by a fresh id; if the file cannot be read or written a fresh,
    unpersisted id is returned.
    """
    node_id_file = Path(tempfile.gettempdir()) / NODE_ID_FILENAME
    try:
        if node_id_file.is_file():
            stored_id = node_id_file.read_text(encoding="utf-8", errors="replace").strip()
            if is_valid_uuid(stored_id):
                logger.debug("Retrieved existing node ID: %s", stored_id)
                return stored_id
            logger.debug("Stored node ID is not a valid UUID; generating a new one")
        new_id = str(uuid.uuid4())
        node_id_file.write_text(new_id, encoding="utf-8")
        logger.debug("Generated and stored new node ID: %s", new_id)
        return new_id
    except OSError as e:
        logger.debug("IO error creating node ID: %s", e)
        return str(uuid.uuid4())


def _read_used_ports(path: Path) -> list[int]:
    try:
        with path.open(encoding="utf-8") as f:
            return [int(line.strip()) for line in f if line.strip().isdigit()]
    except (OSError, UnicodeDecodeError):
        return []


def _write_used_port(path: Path, port: int, used_ports: list[int]) -> None:
    recent = [*used_ports[-(_USED_PORTS_KEPT - 1) :], port]
    try:
        path.write_text("".join(f"{p}\n" for p in recent), encoding="utf-8")
    except OSError as e:
        logger.debug("Could not record used port %d in %s: %s", port, path, e)


def find_available_port(host: str = "", min_port: int = 49152, max_port: int = 65535) -> int:
    """A random port in ``[min_port, max_port]`` that can be bound on ``host``.

    Ports handed out recently (the last 20, kept in ``<tempdir>/exo_used_ports``) are skipped, so that processes
    started close together do not pick the same one. Raises RuntimeError when no port in the range can be bound.
    """
    used_ports_file = Path(tempfile.gettempdir()) / USED_PORTS_FILENAME
    used_ports = _read_used_ports(used_ports_file)
    candidates = list(set(range(min_port, max_port + 1)) - set(used_ports))
    random.shuffle(candidates)
    for port in candidates:
        logger.debug("Trying port %d", port)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        _write_used_port(used_ports_file, port, used_ports)
        return port
    raise RuntimeError("No available ports in the specified range")


# ---------------------------------------------------------------------------
# Network interfaces
# ---------------------------------------------------------------------------


def get_all_ip_addresses_and_interfaces() -> list[tuple[str, str]]:
    """Distinct ``(ipv4 address, interface name)`` pairs of this host; ``[("localhost", "lo")]`` if none."""
    ip_addresses: list[tuple[str, str]] = []
    try:
        interfaces = psutil.net_if_addrs()
    except Exception:
        logger.debug("Failed to list network interfaces", exc_info=True)
        interfaces = {}
    for interface, addresses in interfaces.items():
        name = re.sub(r"^\\Device\\NPF_", "", interface)
        for address in addresses:
            if address.family != socket.AF_INET:
                continue
            ip = address.address
            if not ip or ip.startswith("0.0."):
                continue
            ip_addresses.append((ip, name))
    if not ip_addresses:
        logger.debug("Failed to get any IP addresses; defaulting to localhost")
        return [("localhost", "lo")]
    return list(dict.fromkeys(ip_addresses))


def _classify_macos_interface(data: dict[str, Any], ifname: str) -> tuple[int, str] | None:
    """Priority and type of ``ifname`` from parsed ``system_profiler SPNetworkDataType -json`` output."""
    for interface in data.get("SPNetworkDataType", []):
        if interface.get("interface") != ifname:
            continue
        hardware = str(interface.get("hardware", "")).lower()
        type_name = str(interface.get("type", "")).lower()
        name = str(interface.get("_name", "")).lower()
        if "thunderbolt" in name:
            return (5, "Thunderbolt")
        if hardware == "ethernet" or type_name == "ethernet":
            return (4, "Ethernet [USB]") if "usb" in name else (4, "Ethernet")
        if hardware == "airport" or type_name == "airport" or "wi-fi" in name:
            return (3, "WiFi")
        if type_name == "vpn":
            return (1, "External Virtual")
    return None


async def get_macos_interface_type(ifname: str) -> tuple[int, str] | None:
    """Priority and type of ``ifname`` as macOS's ``system_profiler`` describes it, or None if unknown."""

    def run_profiler() -> str:
        return subprocess.run(
            ["system_profiler", "SPNetworkDataType", "-json"], capture_output=True, text=True, close_fds=True
        ).stdout

    try:
        output = await asyncio.get_running_loop().run_in_executor(subprocess_pool, run_profiler)
        return _classify_macos_interface(json.loads(output), ifname)
    except Exception as e:
        logger.debug("Error detecting macOS interface type: %s", e)
        return None


async def get_interface_priority_and_type(ifname: str) -> tuple[int, str]:
    """``(priority, type)`` of a network interface; higher priorities are preferred for peer connections."""
    if psutil.MACOS:
        macos_type = await get_macos_interface_type(ifname)
        if macos_type is not None:
            return macos_type

    if ifname.startswith(("docker", "br-", "veth", "cni", "flannel", "calico", "weave")) or "bridge" in ifname:
        return (7, "Container Virtual")
    if ifname.startswith("lo"):
        return (6, "Loopback")
    if ifname.startswith(("tb", "nx", "ten")):
        return (5, "Thunderbolt")
    if ifname.startswith(("eth", "en")) and not ifname.startswith(("en1", "en0")):
        return (4, "Ethernet")
    if ifname.startswith(("wlan", "wifi", "wl")) or ifname in ("en0", "en1"):
        return (3, "WiFi")
    if ifname.startswith(("tun", "tap", "vtun", "utun", "gif", "stf", "awdl", "llw")):
        return (1, "External Virtual")
    return (2, "Other")


# ---------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------


class _Stoppable(Protocol):
    def stop(self) -> Awaitable[None]: ...


async def shutdown(signal: Any, loop: asyncio.AbstractEventLoop, server: _Stoppable) -> None:
    """Cancel every other task on the running loop, wait for them to finish, then stop ``server``."""
    logger.info("Received exit signal %s...", getattr(signal, "name", signal))
    logger.info("Thank you for using exo.")
    print_yellow_exo()
    current = asyncio.current_task()
    server_tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in server_tasks:
        task.cancel()
    logger.info("Cancelling %d outstanding tasks", len(server_tasks))
    await asyncio.gather(*server_tasks, return_exceptions=True)
    await server.stop()
