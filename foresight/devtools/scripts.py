"""Loading a script that is not in a package (bench/*.py) as a module, by path."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType


@functools.cache
def load_script(path: str | Path) -> ModuleType:
    """``path`` (a .py file) executed once as a module named after it: bench/ is a folder of scripts, not a package,
    so one script reuses another's cohort builders this way (each later call returns the same module)."""
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
