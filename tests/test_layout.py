"""The tree's house rules, checked on the source: no module imports another module's private name, and modules
stay small enough to read (one concept each)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cryofire_ext", "integrations", "cli")
#: lines a module may hold (ARCHITECTURE.md: "under ~400")
MAX_LINES = 420


def _modules(packages=PACKAGES):
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def private_imports(source: str) -> list[str]:
    """`from X import _name` and `X._name` uses of a module imported by name, in `source` (module-private names
    of our packages' modules; dunders and other libraries' names are not ours to judge)."""
    tree = ast.parse(source)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name} (line {node.lineno})")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    modules.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def test_the_checker_finds_private_imports():
    assert private_imports("from cli.b import _x, y\n") == ["from cli.b import _x (line 1)"]
    assert private_imports("from cryofire_ext import b\nb._hidden()\n") == ["b._hidden (line 2)"]
    assert private_imports("import integrations.b as c\nc._z\n") == ["c._z (line 2)"]
    assert private_imports("from cryofire_ext import b, __version__\nb.__name__\nself._ok = 1\n") == []
    assert private_imports("import shutil\nshutil._ntuple_diskusage\n") == []


@pytest.mark.parametrize("path", _modules(PACKAGES + ("tests", "benchmarks")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_name(path):
    assert private_imports(path.read_text()) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it along a real seam"
