"""This host's network interfaces: their IPv4 addresses, and the priority and type of each (Thunderbolt before
Ethernet before WiFi ...) that peers use to choose which link to connect over."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

logger = logging.getLogger(__name__)

# Worker threads for blocking subprocess calls (e.g. `system_profiler`), shared so they are not spawned per call.
subprocess_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="subprocess_worker")


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
