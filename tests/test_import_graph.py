"""The package's import graph, read from the source (ast, imports inside functions counted too): no circles, every
arrow points down the layers (files, locks, errors -> math -> data / models -> audit / training -> the research
harness's pipelines -> its commands), and a user who only trains with MRPTrainer never loads the harness."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_mrp"
HARNESS = "hf_mrp.research"
# Lowest layer first; a module may import its own layer or a lower one. The first matching prefix wins.
LAYERS = [
    ("hf_mrp.research.cli", 5),
    ("hf_mrp.research.commands", 5),  # the commands parse flags and call the pipelines
    ("hf_mrp.research", 4),
    ("hf_mrp.audit", 3),
    ("hf_mrp.training", 3),
    ("hf_mrp.metrics", 3),
    ("hf_mrp.data", 2),
    ("hf_mrp.models", 2),
    ("hf_mrp.reporting", 2),
    ("hf_mrp.ops", 1),
    ("hf_mrp.stats", 1),
    ("hf_mrp.storage", 0),
    ("hf_mrp.errors", 0),
    ("hf_mrp.hub_access", 0),
    ("hf_mrp.compat", 0),
    ("hf_mrp.noise", 0),
]
# hf_mrp/__init__.py exports lazily (importlib, on first attribute access): it imports nothing when imported, and
# `from hf_mrp import __version__` is safe from any layer.
ROOT_LAYER = 0


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__) for every module of hf_mrp."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _owner(name: str, modules) -> str | None:
    """The module (or package) of hf_mrp that ``name`` (a module, or a name inside one) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: str, path: Path, is_package: bool, modules) -> set[str]:
    """Every hf_mrp module ``module`` imports, at the top or inside a function (``from X import y`` counts
    X.y when y is a module, else X)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_owner(alias.name, modules) for alias in node.names if alias.name.startswith("hf_mrp")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base == "hf_mrp" or base.startswith("hf_mrp."):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in modules else _owner(base, modules))
    found.discard(None)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def layer(module: str) -> int:
    """The module's layer; a module in no layer fails here, so a new folder gets a place in LAYERS."""
    if module == "hf_mrp":
        return ROOT_LAYER
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} is in no layer: give its folder a place in LAYERS (tests/test_import_graph.py)")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "hf_mrp.audit.geometry" in graph["hf_mrp.research.audit_run"]  # top-level, relative (..audit.geometry)
    assert "hf_mrp.audit.tuned_lens" in graph["hf_mrp.research.audit_run"]  # inside a function
    assert "hf_mrp.storage.files" in graph["hf_mrp.audit.geometry"]  # `from ..storage import files`: the module
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_circle_among_the_modules():
    assert find_cycle(import_graph()) is None


def test_every_import_points_down_the_layers():
    graph = import_graph()
    assert {name: layer(name) for name in graph}  # every module has a layer
    upward = sorted(
        f"{source} (layer {layer(source)}) -> {target} (layer {layer(target)})"
        for source, targets in graph.items()
        for target in targets
        if layer(target) > layer(source)
    )
    assert upward == []


def test_no_plugin_module_imports_the_harness():
    graph = import_graph()
    plugin = [name for name in graph if not (name == HARNESS or name.startswith(HARNESS + "."))]
    assert "hf_mrp.training.trainer" in plugin and "hf_mrp.audit.geometry" in plugin
    offending = sorted(
        f"{name} -> {target}"
        for name in plugin
        for target in graph[name]
        if target == HARNESS or target.startswith(HARNESS + ".")
    )
    assert offending == []


def test_training_with_mrp_trainer_imports_no_harness_module():
    script = (
        "import json, sys\nimport hf_mrp\nfrom hf_mrp import MRPTrainer, MRPConfig, run_audit, compare_audits\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.startswith('hf_mrp'))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=PACKAGE.parent, timeout=300
    )
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert "hf_mrp.training.trainer" in loaded  # the import did happen
    assert [name for name in loaded if name == HARNESS or name.startswith(HARNESS + ".")] == []


def test_every_import_of_hf_mrp_names_a_module_that_exists():
    """A relative import one dot short (``..audit`` from research/reports/) reads as the harness' own module to
    the layer check above; it fails only when the function runs. Each one must name a real module."""
    modules = module_files()
    missing = []
    for module, (path, is_package) in modules.items():
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if (base == "hf_mrp" or base.startswith("hf_mrp.")) and base not in modules:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {base}")
    assert not missing, "imports of modules that do not exist: " + "; ".join(missing)
