"""Which inference engine a node runs: `--inference-engine`, else `EXO_ENGINE`, else the build's default."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

from exo import _core
from exo.app.cli_error import CliError

ENGINES = ("candle", "mlx", "dummy")


def mlx_available() -> bool:
    """Whether this build of `exo._core` includes the MLX engine (macOS builds with the `mlx` feature)."""
    return hasattr(_core, "MlxInferenceEngine")


def choose_engine(requested: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The engine to run: `--inference-engine`, else `EXO_ENGINE`, else mlx on a Mac build with it, else candle."""
    name = (requested or environ.get("EXO_ENGINE") or "").strip().lower()
    if not name:
        return "mlx" if mlx_available() else "candle"
    if name not in ENGINES:
        raise CliError(f"unknown inference engine {name!r}; choose one of: {', '.join(ENGINES)}")
    if name == "mlx" and not mlx_available():
        raise CliError(
            "the mlx engine needs a macOS build of xotorch-core with the `mlx` feature; "
            f"this build ({platform.system()} {platform.machine()}) has candle and dummy"
        )
    return name
