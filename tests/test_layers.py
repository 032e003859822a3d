"""The layer graph: core <- privacy <- application, no cycles, no private names across modules, no giant code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from foresight.devtools import layers

ROOT = Path(__file__).resolve().parents[1]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in layers.PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_the_project_has_no_upward_import_no_cycle_no_private_import_and_no_oversized_code():
    report = layers.check(ROOT)
    assert report["modules"] > 50  # the walk found the project, not an empty folder
    assert report["upward_imports"] == []
    assert report["cycles"] == []
    assert report["private_imports"] == []
    assert report["oversized"] == []


def test_a_function_local_upward_import_is_found(tmp_path):
    root = _tree(tmp_path, {
        "foresight/model.py": "def f():\n    from foresight.cli import app  # hidden inside a function\n",
        "foresight/cli.py": "app = 1\n",
    })
    assert layers.check(root)["upward_imports"] == [
        "foresight.model (core) imports foresight.cli (application)"]


def test_a_cycle_through_a_relative_import_is_found(tmp_path):
    root = _tree(tmp_path, {
        "foresight/a.py": "from . import b\n",
        "foresight/b.py": "def g():\n    import foresight.c\n",
        "foresight/c.py": "from foresight.a import x\n",
        "foresight/d.py": "from foresight import a\n",  # depends on the cycle but is not part of it
    })
    assert layers.check(root)["cycles"] == [["foresight.a", "foresight.b", "foresight.c"]]


def test_privacy_may_import_core_but_core_may_not_import_privacy(tmp_path):
    root = _tree(tmp_path, {
        "privacy/gate.py": "from foresight.tokens import Vocabulary\n",
        "foresight/tokens/__init__.py": "import privacy.gate\nVocabulary = 1\n",
    })
    report = layers.check(root)
    assert report["upward_imports"] == ["foresight.tokens (core) imports privacy.gate (privacy)"]
    assert report["cycles"] == [["foresight.tokens", "privacy.gate"]]


def test_private_names_across_modules_and_long_functions_are_reported(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(layers.MAX_FUNCTION_LINES))
    root = _tree(tmp_path, {
        "foresight/a.py": "def _helper():\n    pass\n\n\ndef long():\n" + body,
        "foresight/b.py": "from foresight.a import _helper\n",
    })
    report = layers.check(root)
    assert report["private_imports"] == ["foresight.b imports foresight.a._helper"]
    assert report["oversized"] == [f"foresight/a.py:5 long(): {layers.MAX_FUNCTION_LINES + 1} lines "
                                   f"(max {layers.MAX_FUNCTION_LINES})"]


def test_the_command_prints_the_graph_and_fails_on_a_problem(tmp_path):
    root = _tree(tmp_path, {"foresight/model.py": "import flows\n"})
    cmd = [sys.executable, "-m", "foresight.devtools.layers", "--root", str(root)]
    text = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert text.returncode == 1
    assert "== core" in text.stdout and "foresight.model -> flows" in text.stdout
    as_json = subprocess.run([*cmd, "--json"], capture_output=True, text=True, cwd=ROOT)
    report = json.loads(as_json.stdout.splitlines()[-1])
    assert as_json.returncode == 1 and report["ok"] is False
    assert report["upward_imports"] == ["foresight.model (core) imports flows (application)"]
