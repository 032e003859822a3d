"""The layer graph of the project's own imports, and the checks that keep it a graph of layers.

Three layers, each importing only from the layers before it (never from a later one, never in a cycle)::

    core         foresight.*  schema, sql, hashing, warehouse, sources, concepts, simulate, tokens, dataset, model,
                              train, forecast, evaluate, optout, devtools
    privacy      privacy.*    the release gate
    application  foresight.cli, foresight.serve, foresight.pipeline, foresight.demo, flows.*

Every ``import`` and ``from ... import`` counts, including those inside functions (they hide cycles just as well)
and under ``if TYPE_CHECKING`` (a type that belongs to a later layer is a dependency too). An import names the
module it executes: ``from foresight.tokens import Vocabulary`` depends on the package ``foresight.tokens``,
``from foresight import sql`` on the module ``foresight.sql``.

Private names (``_name``) imported from another module are reported too: make them public in their owner.
The same run checks size: no module over :data:`MAX_MODULE_LINES` lines (the simulator's code catalog, a table of
data, excepted) and no function over :data:`MAX_FUNCTION_LINES`.

Run ``python -m foresight.devtools.layers [--json]``: it prints the graph layer by layer, then every problem, and
exits 1 when there is one.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("foresight", "privacy", "flows")
LAYERS = ("core", "privacy", "application")
APPLICATION = ("foresight.cli", "foresight.serve", "foresight.pipeline", "foresight.demo", "flows")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120
SIZE_EXEMPT = ("foresight/simulate/catalog.py",)  # a table of codes and titles, not logic
PROBLEMS = ("upward_imports", "cycles", "private_imports", "oversized")


@dataclass
class Graph:
    """Modules (dotted name -> file) and their project imports (module -> imported modules)."""

    files: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    private: list[str] = field(default_factory=list)  # "a imports b._name": a private name used across modules


def module_name(path: Path, root: Path) -> str:
    """``foresight/tokens/__init__.py`` -> ``foresight.tokens``; ``flows/etl.py`` -> ``flows.etl``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer a module belongs to (see the module docstring)."""
    if any(module == a or module.startswith(a + ".") for a in APPLICATION):
        return "application"
    return "privacy" if module.split(".")[0] == "privacy" else "core"


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The project modules an import statement executes (third-party imports give nothing)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import: climb from this module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # `from pkg import sub` executes pkg.sub when it is a module, else pkg itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for name in names:
        while name and name not in known:  # `import a.b.c` where only a.b is ours -> a.b
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def build_graph(root: Path) -> Graph:
    """Parse every module of the project's packages under ``root`` and collect their project imports."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    graph = Graph(files)
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                resolved = _resolve(node, module, path.name == "__init__.py", files)
                targets.update(resolved)
                if isinstance(node, ast.ImportFrom) and resolved:
                    graph.private += [f"{module} imports {node.module}.{a.name}" for a in node.names
                                      if a.name.startswith("_") and not a.name.startswith("__")]
        targets.discard(module)
        graph.edges[module] = targets
    return graph


def upward_imports(graph: Graph) -> list[str]:
    """Imports from a later layer (core -> privacy/application, privacy -> application)."""
    out = []
    for src, targets in sorted(graph.edges.items()):
        for dst in sorted(targets):
            if LAYERS.index(layer_of(dst)) > LAYERS.index(layer_of(src)):
                out.append(f"{src} ({layer_of(src)}) imports {dst} ({layer_of(dst)})")
    return out


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph.edges):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter
                counter += 1
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(sorted(graph.edges.get(nxt, ())))))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return found


def oversized(graph: Graph, root: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES and functions over MAX_FUNCTION_LINES lines."""
    out = []
    for path in sorted(graph.files.values()):
        rel = path.relative_to(root).as_posix()
        if rel in SIZE_EXEMPT:
            continue
        text = path.read_text(encoding="utf-8")
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            out.append(f"{rel}: {n} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name}(): {length} lines (max {MAX_FUNCTION_LINES})")
    return out


def check(root: Path) -> dict[str, object]:
    """The whole report: graph by layer, upward imports, cycles, oversized code."""
    graph = build_graph(root)
    by_layer = {layer: {m: sorted(graph.edges[m]) for m in sorted(graph.edges) if layer_of(m) == layer}
                for layer in LAYERS}
    return {"layers": by_layer, "upward_imports": upward_imports(graph), "cycles": cycles(graph),
            "oversized": oversized(graph, root), "private_imports": sorted(graph.private),
            "modules": len(graph.files)}


def main(argv: list[str] | None = None) -> int:
    """Print the layer graph and every problem; exit status 1 when there is one."""
    parser = argparse.ArgumentParser(prog="python -m foresight.devtools.layers", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2],
                        help="folder holding foresight/, privacy/ and flows/ (default: this checkout)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    report = check(args.root)
    problems = sum(len(report[k]) for k in PROBLEMS)
    if args.json:
        print(json.dumps({**report, "ok": problems == 0}))
    else:
        for layer, modules in report["layers"].items():
            print(f"== {layer} ({len(modules)} modules)")
            for m, deps in modules.items():
                print(f"  {m} -> {', '.join(deps) if deps else '-'}")
        for title in PROBLEMS:
            for item in report[title]:
                print(f"{title.upper().replace('_', ' ')}: {' <-> '.join(item) if title == 'cycles' else item}")
        print(f"{report['modules']} modules, {problems} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
