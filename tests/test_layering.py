"""The package's import graph: no cycles, and every layer imports only the layers below.

    nolaserve.v1 (stubs) <- adapters <- server.engine <- server (service) <- clients <- benchmarks

Every import counts, function-local ones included: a lazy import that dodges a cycle is
still a cycle in the design. Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {  # package -> folder, as pyproject.toml maps them
    "nolaserve.v1": ROOT / "protos" / "nolaserve" / "v1",
    "nolaserve.adapters": ROOT / "adapters",
    "nolaserve.server": ROOT / "server",
    "nolaserve.clients": ROOT / "clients",
    "nolaserve.benchmarks": ROOT / "benchmarks",
}
# layer -> the layers it may import (besides itself); longest prefix wins
MAY_IMPORT = {
    "nolaserve.v1": set(),
    "nolaserve.adapters": {"nolaserve.v1"},
    "nolaserve.server.engine": {"nolaserve.v1", "nolaserve.adapters"},
    "nolaserve.server": {"nolaserve.v1", "nolaserve.adapters", "nolaserve.server.engine"},
    "nolaserve.clients": {"nolaserve.v1", "nolaserve.adapters", "nolaserve.server.engine",
                          "nolaserve.server"},
    "nolaserve.benchmarks": {"nolaserve.v1", "nolaserve.adapters", "nolaserve.server.engine",
                             "nolaserve.server", "nolaserve.clients"},
}


def modules() -> dict[str, Path]:
    """Module name -> file of every module of every package."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The nolaserve modules that ``name`` imports, anywhere in its file (a name that is no
    module of ours is kept, for ``test_every_import_names_a_module`` to report)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module; ``from mod import f`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.startswith("nolaserve.") and t != name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imports_of(name, path, known) if t in known}
            for name, path in known.items()}


def test_every_import_names_a_module():
    known = modules()
    missing = sorted(f"{name} -> {t}" for name, path in known.items()
                     for t in imports_of(name, path, known)
                     if t not in known and t != "nolaserve.adapters._philox")  # C extension
    assert not missing, f"imports of modules that do not exist: {missing}"


def layer(name: str) -> str:
    return max((p for p in MAY_IMPORT if name == p or name.startswith(p + ".")), key=len)


def test_the_walk_sees_the_whole_package():
    g = graph()
    assert "nolaserve.server.engine.engine" in g and "nolaserve.v1.admin_pb2" in g
    assert "nolaserve.adapters.store" in g["nolaserve.server.engine.engine"]
    assert "nolaserve.adapters.ops.triton_sgmv" in g["nolaserve.adapters.ops.dispatch"]


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("lower", ["nolaserve.v1", "nolaserve.adapters",
                                   "nolaserve.server.engine", "nolaserve.server",
                                   "nolaserve.clients"])
def test_a_layer_imports_only_the_layers_below_it(lower):
    g = graph()
    wrong = sorted(f"{a} -> {b}" for a, deps in g.items() if layer(a) == lower
                   for b in deps if layer(b) != lower and layer(b) not in MAY_IMPORT[lower])
    assert not wrong, f"{lower} imports a layer above it: {wrong}"


def test_no_server_or_adapter_code_names_the_clients():
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in (ROOT / "server", ROOT / "adapters")
            for p in folder.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if "nolaserve.clients" in line]
    assert not hits, hits


def test_every_typed_error_is_a_serving_error_with_a_status():
    from nolaserve.adapters import errors

    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, errors.ServingError), cls
        assert isinstance(cls.status, errors.Status), cls
    # outside errors.py only a broken invariant (a bug, INTERNAL) may have its own class,
    # and the server's startup error (never a request's)
    internal = {"OutOfBlocksError", "PortInUseError"}
    stray = [f"{p.relative_to(ROOT)}: {line}" for folder in ("adapters", "server")
             for p in (ROOT / folder).rglob("*.py") if p.name != "errors.py"
             for line in p.read_text().splitlines()
             if line.startswith("class ") and "Error" in line.split("(")[0]
             and line[6:].split("(")[0] not in internal]
    assert not stray, f"error classes outside adapters/errors.py: {stray}"


def test_no_http_module_imports_grpc():
    """The HTTP front end maps ``Status`` to HTTP itself; gRPC is another front end's."""
    folder = ROOT / "server" / "openai_api"
    hits = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            hits += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "grpc"]
    assert len(list(folder.rglob("*.py"))) >= 5
    assert not hits, f"server/openai_api imports grpc: {hits}"


def test_the_top_package_loads_under_one_name_only():
    """server/toplevel is the package ``nolaserve``; the editable install also finds it as
    ``nolaserve.server.toplevel``, which would load a second copy."""
    import nolaserve

    with pytest.raises(ImportError, match="import nolaserve"):
        importlib.import_module("nolaserve.server.toplevel")
    assert "nolaserve.server.toplevel" not in sys.modules
    assert nolaserve.SamplingParams.__module__ == "nolaserve.server.engine.sequence"
