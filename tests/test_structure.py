"""The installed package's import structure: no import circles, no module using
another module's private (``_x``) names, and the layers pointing one way (the
transports, the device processes and the runtime never import `mserve.server`,
the MindSpore-shaped face over them).

The graph is read from the source with `ast` (every import, also those inside
functions, since a lazy import is still a dependency), so it holds for code paths
no other test happens to run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import mserve

PACKAGE = Path(mserve.__file__).parent


def modules_of(root: Path, package: str = "mserve") -> dict[str, Path]:
    """Module name -> file, for every .py under ``root`` (a package named ``package``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package] + parts)] = path
    return found


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package modules it imports, private names used across modules)."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}  # local name -> module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _target(module, path, node)
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in modules:  # `from . import server`: a module
                        edges[module].add(full)
                        aliases[alias.asname or alias.name] = full
                    elif target in modules:
                        edges[module].add(target)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{module} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        edges[module].add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                target = aliases[node.value.id]
                if target != module and node.attr.startswith("_") and not node.attr.startswith("__"):
                    private.append(f"{module} uses {target}.{node.attr}")
        edges[module].discard(module)
    return edges, private


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_a_circle_and_a_private_name(tmp_path):
    """The checker itself: a made-up package with a circle and a private import."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from .sub import b\n    return b.g()\n")
    (root / "sub" / "b.py").write_text("from ..a import f as _unused\nfrom .. import a\nx = a._hidden\n")
    (root / "c.py").write_text("from .sub.b import _secret\n")
    edges, private = import_graph(modules_of(root, "pkg"))
    assert circles(edges) == [["pkg.a", "pkg.sub.b"]]
    assert sorted(private) == ["pkg.c imports pkg.sub.b._secret", "pkg.sub.b uses pkg.a._hidden"]


def test_no_import_circles():
    edges, _ = import_graph(modules_of(PACKAGE))
    assert circles(edges) == []


def test_no_module_uses_another_modules_private_names():
    _, private = import_graph(modules_of(PACKAGE))
    assert private == []


def test_transports_devices_and_runtime_do_not_import_the_server_facade():
    edges, _ = import_graph(modules_of(PACKAGE))
    layers = ("mserve.transport", "mserve.devices", "mserve.runtime", "mserve.serving", "mserve.protocol", "mserve.ops")
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in edges.items()
        if module.startswith(layers)
        for target in targets
        if target == "mserve.server" or target.startswith("mserve.server.")
    )
    assert offenders == []


def test_the_server_facade_is_thin_and_says_what_it_exports():
    from mserve import server

    facade = PACKAGE / "server" / "__init__.py"
    assert len(facade.read_text().splitlines()) < 300
    for name in ("start_servables", "start_restful_server", "start_grpc_server", "stop", "ServableStartConfig",
                 "SSLConfig"):
        assert name in server.__all__
    missing = [name for name in server.__all__ if not hasattr(server, name)]
    assert missing == []
