"""The package's layout is its architecture: ``core`` (framework-free) <- ``integration`` (the
Axolotl plugin) <- the commands at the top, imports running one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PACKAGE = REPO / "axolotl_dskd"
COMMANDS = {"axolotl_dskd.cache_teacher", "axolotl_dskd.evaluate", "axolotl_dskd.dolly"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (``from a import b`` counts ``a.b``
    when that is a module of this package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return found


def tier(name: str) -> int:
    if name.startswith("axolotl_dskd.core"):
        return 0
    if name.startswith("axolotl_dskd.integration"):
        return 1
    return 2


def test_each_module_imports_only_its_own_tier_and_those_below():
    upward = {
        (name, target)
        for name, path in MODULES.items()
        if name != "axolotl_dskd"  # the package exposes DSKDPlugin lazily
        for target in imports(path)
        if target in MODULES and target != "axolotl_dskd" and tier(target) > tier(name)
    }
    assert not upward
    core_uses_axolotl = {
        (name, target)
        for name, path in MODULES.items()
        if tier(name) == 0
        for target in imports(path)
        if target == "axolotl" or target.startswith("axolotl.")
    }
    assert not core_uses_axolotl


def test_the_package_modules_import_each_other_without_a_circle():
    graph = {
        name: {t for t in imports(path) if t in MODULES and t != "axolotl_dskd"}
        for name, path in MODULES.items()
    }
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, " -> ".join((*trail, name))
        if name in done:
            return
        for target in graph[name]:
            visit(target, (*trail, name))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_the_core_imports_without_axolotl_installed():
    core = sorted(n for n in MODULES if tier(n) == 0)
    code = (
        "import sys, importlib\n"
        "sys.modules['axolotl'] = None  # any import of Axolotl fails\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
