"""The house rules a reader leans on, read from the source: no module of hf_mrp over MAX_MODULE_LINES lines, no
function or method (nested ones too) over MAX_FUNCTION_LINES lines (from its ``def`` line to its last line)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_mrp"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def long_modules() -> list[str]:
    """'hf_mrp/x.py: N lines' for each module over MAX_MODULE_LINES."""
    found = []
    for path in modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{_name(path)}: {lines} lines")
    return found


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function and method in ``source``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert child.end_lineno is not None
                found.append((prefix + child.name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def long_functions() -> list[str]:
    """'hf_mrp/x.py:LINE name: N lines' for each function or method over MAX_FUNCTION_LINES."""
    found = []
    for path in modules():
        for name, line, length in function_lengths(path.read_text(encoding="utf-8")):
            if length > MAX_FUNCTION_LINES:
                found.append(f"{_name(path)}:{line} {name}: {length} lines")
    return found


def test_the_rules_see_what_they_measure():
    """The measure itself, on a made-up module: a method of a class (its decorator not counted: from the def line
    on) and a function nested in another, each counted on its own and inside its parent."""
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    source = f"class A:\n    @staticmethod\n    def long():\n{body.replace('    ', '        ')}\n\n"
    source += f"def outer():\n    def inner():\n{body.replace('    ', '        ')}\n    return inner\n"
    lengths = {name: length for name, _, length in function_lengths(source)}
    assert lengths == {"A.long": 62, "outer": 64, "outer.inner": 62}
    assert any(path.name == "fused.py" for path in modules())  # the package was found


def test_no_module_is_over_300_lines():
    assert long_modules() == [], "split these modules by concept:\n" + "\n".join(long_modules())


def test_no_function_is_over_60_lines():
    assert long_functions() == [], "split these functions:\n" + "\n".join(long_functions())


REGISTRY = PACKAGE / "ops" / "objectives"  # the registry of objectives: the one place that names them
SCANNED = [PACKAGE, PACKAGE.parent / "benchmarks", PACKAGE.parent / "examples"]
EQUALITY = (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)


def objective_name_comparisons(source: str, names: set[str]) -> list[str]:
    """'LINE: code' for each comparison of a value with a registered objective's name written as a string literal:
    ``x == "fisher"``, ``"margin" != x``, ``x in ("margin", ...)``, ``case "entropy":``. Subscripts and membership
    of a literal in a table (``positions["margin"]``, ``"margin" in columns``) are not comparisons of a name."""

    def named(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    found = []
    for node in ast.walk(ast.parse(source)):
        hit = False
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:]):
                hit |= isinstance(op, EQUALITY) and (named(left) or named(right))
                literal_set = isinstance(right, (ast.Tuple, ast.List, ast.Set))
                hit |= isinstance(op, (ast.In, ast.NotIn)) and literal_set and any(map(named, right.elts))
        elif isinstance(node, ast.MatchValue):
            hit = named(node.value)
        if hit:
            found.append(f"{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_the_name_scan_sees_what_it_measures():
    source = (
        'a = x == "fisher"\nb = "margin" != y\nc = z in ("entropy", "q")\nd = positions["margin"]\n'
        'e = "margin" in columns\nf = w == "fisherman"\nmatch v:\n    case "proxy":\n        pass\n'
    )
    found = objective_name_comparisons(source, {"fisher", "margin", "entropy", "proxy"})
    assert [line.split(":")[0] for line in found] == ["1", "2", "3", "8"], found


def test_no_objective_name_is_compared_outside_the_registry():
    """The fused loss, the configs, the audit, the command line and the sweep read the registry's records (what an
    objective reads, whether it is gated, its closed form, its memory); none of them compares names."""
    from hf_mrp.ops.objectives import objective_names

    names = set(objective_names())
    assert {"margin", "fisher", "entropy", "correct_margin", "proxy", "proxy_gated"} <= names
    found = []
    for root in SCANNED:
        for path in sorted(root.rglob("*.py")):
            if REGISTRY in path.parents:
                continue
            found += [
                f"{path.relative_to(PACKAGE.parent)}:{hit}"
                for hit in objective_name_comparisons(path.read_text(encoding="utf-8"), names)
            ]
    assert found == [], "compare records, not names:\n" + "\n".join(found)
