"""The dependency direction of DESIGN.md, checked on the import graph of src/atoll (built with ast).

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency). ``from pkg import name`` points at the submodule that defines ``name`` when the
package's ``__init__`` only re-exports it, so a re-exporting ``__init__`` is never a node of a
cycle by itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# the stages and the parts built on them: they never reach up to the runtime, the wire or the edge
STAGES = ("atoll.tree", "atoll.rng", "atoll.types", "atoll.errors", "atoll.wireformat", "atoll.parse_lock",
          "atoll.sampling", "atoll.transforms", "atoll.codecs", "atoll.aggregators",
          "atoll.privacy", "atoll.client", "atoll.algorithm", "atoll.algorithms")
ABOVE_STAGES = ("atoll.runtime", "atoll.transport", "atoll.config", "atoll.cli",
                "atoll.simulation", "atoll.asynchronous", "atoll.deploy", "atoll.wiring")
# DESIGN.md's direction below the runtime: a module imports only its own rank and those below
RANKS = [("atoll.tree", "atoll.rng", "atoll.types", "atoll.errors", "atoll.wireformat", "atoll.parse_lock",
          "atoll.sampling", "atoll.data.batching"),
         ("atoll.transforms", "atoll.codecs", "atoll.aggregators", "atoll.privacy"),
         ("atoll.client", "atoll.algorithm"),
         ("atoll.algorithms",)]
ONLY_IMPORTED_BY = {"grpc": ("atoll.transport",), "ray": ("atoll.runtime.ray",)}


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file for every module of the atoll package."""
    out = {}
    for path in sorted((src / "atoll").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(mods, name):
    return name in mods and mods[name].name == "__init__.py"


def _raw_imports(name: str, path: Path):
    """(module, imported names or None) for every import statement, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            yield str(node.args[0].value), None


def _defines(path: Path, name: str) -> bool:
    """Whether ``name`` is bound at the top level of the file by a def, class or assignment."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def _resolve(mods, package: str, name: str, seen=()) -> str:
    """The module that really provides ``name`` to ``from package import name``."""
    if f"{package}.{name}" in mods:
        return f"{package}.{name}"
    path = mods[package]
    if _defines(path, name) or package in seen:
        return package
    for base, names in _raw_imports(package, path):  # re-exported from a submodule
        if names and name in names and _under(base, ("atoll",)) and base in mods:
            return _resolve(mods, base, name, seen + (package,)) if _is_package(mods, base) else base
    for sub in sorted(m for m in mods if m.rpartition(".")[0] == package):  # lazy __getattr__
        if _defines(mods[sub], name):
            return sub
    return package


def reexport_only(path: Path) -> bool:
    """A package ``__init__`` whose top level holds only a docstring, imports and ``__all__``."""
    if path.name != "__init__.py":
        return False
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and all(getattr(t, "id", "") == "__all__" for t in node.targets):
            continue
        return False
    return True


def import_graph(src: Path = SRC):
    """(edges between atoll modules, third-party top-level names imported by each module)."""
    mods = modules(src)
    edges = {m: set() for m in mods}
    external = {m: set() for m in mods}
    for name, path in mods.items():
        for base, names in _raw_imports(name, path):
            if not _under(base, ("atoll",)):
                external[name].add(base.partition(".")[0])
                continue
            if base not in mods:
                continue
            if names and _is_package(mods, base):
                targets = {_resolve(mods, base, n) for n in names if n != "*"}
            else:
                targets = {base}
            edges[name] |= targets - {name}
    return edges, external


def contract(edges, nodes) -> dict[str, set]:
    """``edges`` without ``nodes``: an import of one of them becomes an import of everything it
    imports (``from atoll import codecs`` depends on all that ``codecs/__init__`` pulls in)."""
    def reach(v, seen):
        out = set()
        for w in edges[v] - seen:
            out |= reach(w, seen | {w}) if w in nodes else {w}
        return out
    return {v: reach(v, {v}) - {v} for v in edges if v not in nodes}


def cycles(edges, skip=()) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ``skip`` left out."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w in skip:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index and v not in skip:
            visit(v)
    return out


def layer_violations(edges):
    return sorted(f"{m} -> {t}" for m, ts in edges.items() if _under(m, STAGES)
                  for t in ts if _under(t, ABOVE_STAGES))


def rank_violations(edges):
    """Imports from a ranked module to a higher rank, or to a module outside the ranks."""
    def rank(m):
        return next((i for i, r in enumerate(RANKS) if _under(m, r)), None)
    return sorted(f"{m} -> {t}" for m, ts in edges.items() if rank(m) is not None
                  for t in ts if rank(t) is None or rank(t) > rank(m))


def library_violations(external):
    return sorted(f"{m} imports {lib}" for m, libs in external.items() for lib in libs
                  if lib in ONLY_IMPORTED_BY and not _under(m, ONLY_IMPORTED_BY[lib]))


def _package_graph(edges):
    """The graph with the re-export-only package ``__init__`` modules contracted away."""
    return contract(edges, {m for m, p in modules().items() if reexport_only(p)})


def test_graph_sees_lazy_and_reexported_imports():
    edges, external = import_graph()
    assert "atoll.runtime.loop" in edges["atoll.runtime"]  # imported inside make_runtime()
    assert "ray" in external["atoll.runtime.ray"]  # imported inside methods only
    assert "atoll.codecs.clip" in edges["atoll.codecs"]
    assert reexport_only(modules()["atoll.codecs"])
    assert not reexport_only(modules()["atoll.runtime"])
    # ``from atoll.privacy import Accountant`` reaches the module behind the lazy __getattr__
    assert _resolve(modules(), "atoll.privacy", "Accountant") == "atoll.privacy.accountant"


def test_cycle_finder_on_a_known_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set(), "f": {"g"},
         "g": {"f"}}
    assert cycles(g) == [["a", "b", "c"], ["f", "g"]]
    assert cycles(g, skip={"g"}) == [["a", "b", "c"]]
    # a re-exporting package between two modules still closes their cycle once contracted
    h = {"x": {"pkg"}, "pkg": {"pkg.y"}, "pkg.y": {"x"}}
    assert contract(h, {"pkg"}) == {"x": {"pkg.y"}, "pkg.y": {"x"}}
    assert cycles(contract(h, {"pkg"})) == [["pkg.y", "x"]]
    assert layer_violations({"atoll.codecs.x": {"atoll.transport.wire", "atoll.tree"}}) == [
        "atoll.codecs.x -> atoll.transport.wire"]
    assert rank_violations({"atoll.privacy.x": {"atoll.client", "atoll.codecs"}}) == [
        "atoll.privacy.x -> atoll.client"]
    assert library_violations({"atoll.deploy.x": {"grpc"}, "atoll.transport.y": {"grpc"},
                               "atoll.runtime.loop": {"ray"}}) == [
        "atoll.deploy.x imports grpc", "atoll.runtime.loop imports ray"]


def test_stages_do_not_import_runtime_transport_or_config():
    edges, _ = import_graph()
    bad = layer_violations(edges)
    assert not bad, "stages import from above them:\n" + "\n".join(bad)


def test_core_stages_client_algorithms_import_only_downwards():
    edges, _ = import_graph()
    bad = rank_violations(edges)
    assert not bad, "imports against core <- stages <- client, algorithm <- algorithms:\n" + "\n".join(bad)


def test_only_transport_imports_grpc_and_only_runtime_ray_imports_ray():
    _, external = import_graph()
    bad = library_violations(external)
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges, _ = import_graph()
    found = cycles(_package_graph(edges))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


if __name__ == "__main__":  # print what the checks find
    e, x = import_graph()
    print("\n".join(layer_violations(e) + rank_violations(e) + library_violations(x)))
    for c in cycles(_package_graph(e)):
        print("cycle:", " <-> ".join(c))
