"""Which inference engine a node runs: `--inference-engine`, else `EXO_ENGINE`, else the build's default.

exo classic's and xotorch's engine names (`tinygrad`, `torch`, `pytorch`, `cpu`, `mlx` without an MLX build, and
their class names) start the candle engine, with a one-line notice that says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from exo import _core
from exo.app.cli_error import CliError
from exo.inference.inference_engine import CLASSIC_ENGINES, engine_name_for, inference_engine_classes

ENGINES = ("candle", "mlx", "rkllm", "dummy")


def mlx_available() -> bool:
    """Whether this build of `exo._core` includes the MLX engine (macOS builds with the `mlx` feature)."""
    return hasattr(_core, "MlxInferenceEngine")


@dataclass(frozen=True)
class EngineChoice:
    """The engine a node runs (`candle`, `mlx`, `rkllm` or `dummy`), and the other project's engine it stands in for."""

    name: str
    stands_in_for: str | None = None
    #: The device the name implies (`cpu`), used unless `--device` or `EXO_DEVICE` names one.
    device: str | None = None

    def notice(self) -> str | None:
        """One line naming the engine used in place of the one asked for; None when it is the one asked for."""
        if self.stands_in_for is None:
            return None
        what = CLASSIC_ENGINES[self.stands_in_for.lower()]
        used = f"{self.name} ({inference_engine_classes.get(self.name, self.name)})"
        return f"Inference engine {self.stands_in_for!r} ({what}) is not part of this build; using {used} instead"


def choose_engine(requested: str | None, environ: Mapping[str, str] = os.environ) -> EngineChoice:
    """The engine to run: `--inference-engine`, else `EXO_ENGINE`, else mlx on a Mac build with it, else candle."""
    asked = (requested or environ.get("EXO_ENGINE") or "").strip()
    if not asked:
        return EngineChoice("mlx" if mlx_available() else "candle")
    name = engine_name_for(asked, mlx_built=mlx_available())
    if name is None:
        short = sorted(n for n in CLASSIC_ENGINES if not n.endswith("engine"))
        known = ", ".join(dict.fromkeys([*ENGINES, *short]))
        raise CliError(f"unknown inference engine {asked!r}; choose one of: {known}")
    if asked.lower() not in CLASSIC_ENGINES or name != "candle":
        return EngineChoice(name)
    return EngineChoice(name, stands_in_for=asked, device="cpu" if asked.lower() == "cpu" else None)
