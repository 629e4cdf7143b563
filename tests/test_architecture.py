"""The dependency direction of pyproject.toml's import-linter contracts, and no import cycle anywhere.

Layers (top to bottom): mopd's application modules, `rollout | trainer` (peers), `toolbox`, `envs`,
the leaf `mopd.core`. A failure prints the import chain that breaks a contract.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONFIG = PYPROJECT["tool"]["importlinter"]
CONTRACTS = {c["id"]: c for c in CONFIG["contracts"]}


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_package_and_mopd_module_sits_in_a_layer():
    """A new installed package, or a new module under mopd/, must be placed in the contracts."""
    installed = {name.rstrip("*") for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert set(CONFIG["root_packages"]) == installed
    top = {m.strip() for m in CONTRACTS["layers"]["layers"][0].split(":")}
    children = {p.stem for p in (REPO / "mopd").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert {f"mopd.{c}" for c in children} - {"mopd.core"} == top
    assert set(CONTRACTS["leaf"]["forbidden_modules"]) >= top


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    lines = []
    for importer in cycle:
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported in cycle:
                for detail in graph.get_import_details(importer=importer, imported=imported):
                    lines.append(f"  {importer}:{detail['line_number']} {detail['line_contents']}")
    return "\n".join(lines)


def test_no_import_cycle_between_modules():
    """Module-level, where the sibling contract squashes packages: also a package's
    __init__ and its own submodules importing each other."""
    graph = grimp.build_graph(*CONFIG["root_packages"], exclude_type_checking_imports=True)
    for rule in CONTRACTS["acyclic"].get("ignore_imports", []):  # the same temporary exceptions
        importer, imported = (part.strip() for part in rule.split("->"))
        graph.remove_import(importer=importer, imported=imported)
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(f"import cycle {c}:\n{describe(graph, c)}" for c in cycles)


def test_cycle_check_finds_a_cycle_through_a_package_init():
    graph = grimp.ImportGraph()
    graph.add_import(importer="pkg", imported="pkg.a")
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg")
    graph.add_import(importer="pkg.b", imported="other")
    assert import_cycles(graph) == [["pkg", "pkg.a", "pkg.b"]]
