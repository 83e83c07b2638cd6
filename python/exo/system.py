"""The host exo runs on: its platform as exo classic names it, whether exo runs frozen, and exo's home folder."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import psutil


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
