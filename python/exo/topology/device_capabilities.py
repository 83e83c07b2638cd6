"""What a node's device can do (exo classic's `exo.topology.device_capabilities`).

Detection runs in Rust (`device_capabilities()`); on macOS the model, chip and memory come
from `system_profiler`, as in exo classic.
"""

import asyncio
import subprocess
import sys

from exo._core import (
    CHIP_FLOPS,
    TFLOPS,
    UNKNOWN_DEVICE_CAPABILITIES,
    DeviceCapabilities,
    DeviceFlops,
)
from exo._core import device_capabilities as _detect_device_capabilities


def _parse_system_profiler(output: str) -> tuple[str, str, int]:
    """Model name, chip and memory in MB from `system_profiler SPHardwareDataType` output."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep and key not in fields:
            fields[key] = value.strip()
    model = fields.get("Model Name", "Unknown Model")
    chip = fields.get("Chip", "Unknown Chip")
    amount, _, unit = fields.get("Memory", "0 MB").partition(" ")
    memory = int(amount) * 1024 if unit.strip() == "GB" else int(amount)
    return model, chip, memory


async def mac_device_capabilities() -> DeviceCapabilities:
    """The Mac's capabilities from `system_profiler`, with FLOPS from the chip table."""
    try:
        raw = await asyncio.get_running_loop().run_in_executor(
            None, lambda: subprocess.check_output(["system_profiler", "SPHardwareDataType"])
        )
        model, chip, memory = _parse_system_profiler(raw.decode("utf-8"))
    except (OSError, subprocess.CalledProcessError, ValueError):
        return UNKNOWN_DEVICE_CAPABILITIES
    return DeviceCapabilities(
        model=model, chip=chip, memory=memory, flops=CHIP_FLOPS.get(chip, DeviceFlops(fp32=0, fp16=0, int8=0))
    )


async def device_capabilities() -> DeviceCapabilities:
    """This machine's model, chip, memory (MB) and FLOPS estimate."""
    if sys.platform == "darwin":
        return await mac_device_capabilities()
    return await _detect_device_capabilities()


__all__ = [
    "CHIP_FLOPS",
    "TFLOPS",
    "UNKNOWN_DEVICE_CAPABILITIES",
    "DeviceCapabilities",
    "DeviceFlops",
    "device_capabilities",
    "mac_device_capabilities",
]
