"""Foresight: EHR -> MEDS events -> a generative model of patient timelines -> forecasts, behind a privacy gate."""

from __future__ import annotations

from typing import Any

from foresight.version import __version__

__all__ = ["Forecaster", "__version__"]


def __getattr__(name: str) -> Any:
    # `from foresight import Forecaster` without importing torch when the package is imported (the CLI's
    # quick commands and `import foresight.schema` stay fast).
    if name == "Forecaster":
        from foresight.forecast import Forecaster

        return Forecaster
    raise AttributeError(f"module 'foresight' has no attribute {name!r}")
