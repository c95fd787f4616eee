"""The layout the design names, checked on the source and on the installed package:
one top-level package; client/ and server/ depend on common/ only; no import cycles."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "client", "server", "simulations")  # installed as candor.<name>


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["candor", *parts])


def _imports() -> dict[str, set[str]]:
    """candor module -> the candor modules it imports, at module level or inside functions."""
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")
                        base = base[: len(base) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    found.add(target)
                    found |= {f"{target}.{a.name}" for a in node.names}
            graph[name] = {m for m in found if m.startswith("candor.")}
    modules = set(graph)
    return {m: {t for t in targets if t in modules and t != m} for m, targets in graph.items()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_the_installed_distribution_has_one_top_level_package():
    dist = importlib.metadata.distribution("candor-fl")
    assert dist.read_text("top_level.txt").split() == ["candor"]
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"candor-sim": "candor.simulations.cli:main", "candor-client": "candor.client.cli:main",
                       "candor-server": "candor.server.cli:main",
                       "candor-clientapp": "candor.client.clientapp_main:main"}  # the site's guard (docs/deployment.md)


@pytest.mark.parametrize("name", PACKAGES)
def test_no_generic_top_level_name_is_importable(name):
    import importlib.util

    assert importlib.util.find_spec(f"candor.{name}") is not None
    spec = importlib.util.find_spec(name)
    assert spec is None or not str(spec.origin or "").startswith(str(ROOT)), f"'{name}' importable from {spec.origin}"


def test_dependency_direction():
    """common imports nothing local; client and server only common; never simulations."""
    allowed = {"common": {"common"}, "client": {"common", "client"}, "server": {"common", "server"},
               "simulations": set(PACKAGES)}
    wrong = sorted(f"{m} imports {t}" for m, targets in _imports().items() for t in targets
                   if _layer(t) not in allowed[_layer(m)])
    assert wrong == []


def test_no_import_cycles():
    graph = _imports()
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []
