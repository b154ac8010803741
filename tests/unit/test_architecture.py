"""Dependencies between the top-level packages go one way (README, "Layout").

Every ``import`` is read from the source with ``ast``, including imports inside functions, which
is where a cycle hides best.
"""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Each package and the packages it may import. Lower layers never import higher ones.
ALLOWED: dict[str, frozenset[str]] = {
    "model": frozenset(),
    "memory_bank": frozenset({"model"}),
    "runtime": frozenset({"model", "memory_bank"}),
    "service": frozenset({"model", "memory_bank", "runtime"}),
    "worker": frozenset({"model", "memory_bank", "runtime"}),
    "ditmem": frozenset({"model", "memory_bank", "runtime", "service", "worker"}),
}


def imported_packages(source: str, own: str, packages: set[str]) -> list[tuple[int, str]]:
    """``(line, package)`` of every import of one of ``packages`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [own] if node.level else [node.module or ""]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in packages]
    return found


def package_imports(root: Path, packages: set[str]) -> dict[tuple[str, str], list[str]]:
    """``(importer, imported) -> ["file:line", ...]`` across the packages under ``root``."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for line, imported in imported_packages(path.read_text(), package, packages):
                if imported != package:
                    edges[package, imported].append(f"{path.relative_to(root)}:{line}")
    return edges


def cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported in edges:
        graph[importer].add(imported)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return list(error.args[1])
    return None


@pytest.fixture(scope="module")
def edges() -> dict[tuple[str, str], list[str]]:
    return package_imports(REPO, set(ALLOWED))


def test_every_top_level_package_is_in_the_layer_table():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(ALLOWED)


def test_no_cycle_between_top_level_packages(edges):
    assert cycle(edges) is None, f"import cycle: {' -> '.join(cycle(edges))}"


def test_the_http_service_never_imports_the_workers(edges):
    assert ("service", "worker") not in edges, edges.get(("service", "worker"))
    assert ("worker", "service") not in edges, edges.get(("worker", "service"))


def test_every_import_follows_the_layers(edges):
    wrong = {
        f"{importer} -> {imported}": where
        for (importer, imported), where in edges.items()
        if imported not in ALLOWED[importer]
    }
    assert not wrong, wrong


def test_the_checker_sees_imports_hidden_in_functions_and_cycles(tmp_path):
    """The checks above can fail: a cycle through a function-level import is found."""
    for name, body in {
        "low": "def f():\n    from high.x import y\n",
        "high": "import low.z\n",
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    found = package_imports(tmp_path, {"low", "high"})
    assert found == {
        ("low", "high"): ["low/__init__.py:2"],
        ("high", "low"): ["high/__init__.py:1"],
    }
    assert set(cycle(found)) == {"low", "high"}


# -- the memory bank is the only door to its manifest and files ------------------------------------


def reaches_into_bank_store(source: str) -> list[int]:
    """Lines where ``source`` reads ``.store`` of a bank (``bank``, ``self.bank``, ``opened``)."""

    def named_like_a_bank(node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute):
            name = node.attr
        else:
            return False
        name = name.lower()
        return name.endswith("bank") or name == "opened"

    return sorted(
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr == "store"
        and named_like_a_bank(node.value)
    )


def sources_outside_the_bank(root: Path) -> list[Path]:
    return sorted(
        path
        for path in root.rglob("*.py")
        if path.relative_to(root).parts[0] not in ("memory_bank", "tests")
        and not any(part.startswith(".") or part in ("venv", "site-packages")
                    for part in path.relative_to(root).parts)
    )  # fmt: skip


def test_only_the_memory_bank_touches_its_clip_store():
    """Everything outside ``memory_bank/`` uses ``MemoryBank``'s methods, never ``bank.store``."""
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for path in sources_outside_the_bank(REPO)
        for line in reaches_into_bank_store(path.read_text())
    ]
    assert not offenders, f"use MemoryBank's public API instead of its store: {offenders}"


def test_the_store_checker_sees_every_way_to_name_a_bank():
    source = (
        "a = bank.store\n"
        "b = self.bank.store.get(1)\n"
        "c = opened.store\n"
        "d = memory_bank.store\n"
        "e = state.store\n"  # a job store, not a bank's
        "f = self.store\n"
    )
    assert reaches_into_bank_store(source) == [1, 2, 3, 4]
    assert any(p.parts[-2:] == ("model", "training.py") for p in sources_outside_the_bank(REPO))
    assert not any("memory_bank" in p.parts for p in sources_outside_the_bank(REPO))
