"""The code's layout holds: data flows one way (floors), no import cycle, small files, no body
written twice. See DESIGN.md and the README's "How the code is laid out"."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "xlens_align"

# Each top-level module or subpackage of xlens_align and its floor: a module may import only from
# its own floor or lower ones (and never in a cycle).
FLOORS = {
    0: {
        "validate",
        "files",
        "points",
        "stats",
        "tokens",
        "tokenizers",
        "tokenizer_build",
        "packaged",
        "corpus",
        "passages",
        "distributed",
    },
    1: {"models", "loading", "remote", "shadow"},
    2: {"activations", "patching", "rows", "testing", "suffix"},
    3: {"maps", "similarity", "scoring", "plan"},
    4: {"effects", "transfer", "fitting"},
    5: {"report"},
    6: {"cli"},
}
FLOOR = {name: f for f, names in FLOORS.items() for name in names}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """xlens_align modules imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("xlens_align")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("xlens_align"):
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}
    mods = _modules()
    return {m for m in found if m in mods and m != name}


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_floor():
    unknown = sorted({_top(m) for m in _modules()} - set(FLOOR) - {""})
    assert not unknown, f"give these modules a floor in FLOORS (and the README's layout): {unknown}"


def test_data_flows_down_the_floors():
    wrong = []
    for name, path in _modules().items():
        if not _top(name):
            continue  # the package root re-exports lazily
        for dep in _imports(name, path):
            if _top(dep) and FLOOR[_top(dep)] > FLOOR[_top(name)]:
                wrong.append(f"{name} (floor {FLOOR[_top(name)]}) imports {dep} (floor {FLOOR[_top(dep)]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    mods = _modules()
    graph = {name: {d for d in _imports(name, path) if d != name} for name, path in mods.items()}
    # a package's __init__ re-exports its own submodules: that edge is not a cycle between modules
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = defaultdict(int)
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in graph[n]:
            if d.startswith(n + "."):
                continue
            if state[d] == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state[d] == 0:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if state[n] == 0:
            visit(n)


def test_files_are_small():
    big = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"files over {MAX_LINES} lines: {big}"


def test_no_two_functions_share_a_body():
    """Function bodies (docstrings left out) of three or more statements must differ."""
    seen: dict[str, str] = {}
    twice = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
            ):
                body = body[1:]
            if len(body) < 3:
                continue
            key = "\n".join(ast.dump(s) for s in body)
            where = f"{path.relative_to(PKG)}:{node.lineno} {node.name}"
            if key in seen:
                twice.append(f"{seen[key]} == {where}")
            else:
                seen[key] = where
    assert not twice, "\n".join(twice)
