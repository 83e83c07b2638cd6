"""What exo prints to a terminal: its banner, hyperlinks, and sizes and rates in binary units."""

from __future__ import annotations

exo_text = r"""
  _____  _____  
 / _ \ \/ / _ \ 
|  __/>  < (_) |
 \___/_/\_\___/ 
    """  # noqa: W291


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
