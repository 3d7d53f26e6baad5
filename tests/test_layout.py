"""The package's layout as docs/ARCHITECTURE.md describes it: no import circle between onnxopt's modules
(module-level imports), every pass in passes/ named in the map, and no technique module importing a pass."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "onnxopt"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(lazy: bool = False) -> dict[str, set[str]]:
    """{module: onnxopt modules it imports at module level}, or with `lazy` also inside functions."""
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        tree = ast.parse(path.read_text())
        for node in (ast.walk(tree) if lazy else tree.body):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        out[name] = {d for d in deps if d in mods and d != name}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None. A package's __init__ importing its own submodules is not a circle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if not state.get(d) and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if not state.get(m) and (c := visit(m)):
            return c
    return None


def test_no_import_circle():
    """None at module level, and none dodged by a function-level import either."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]   # the check finds one
    for lazy in (False, True):
        imports = _imports(lazy)
        # Importing a package runs its __init__: an edge into a submodule also depends on the package.
        graph = {m: set(ds) | {d.rsplit(".", 1)[0] for d in ds if d.rsplit(".", 1)[0] in imports and d.rsplit(".", 1)[0] != m
                               and not m.startswith(d.rsplit(".", 1)[0] + ".")} for m, ds in imports.items()}
        assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_passes_in_the_map_and_techniques_import_no_pass():
    import onnxopt.passes
    doc = (PKG.parent / "docs" / "ARCHITECTURE.md").read_text()
    where = {n: getattr(onnxopt.passes, n).__module__ for n in onnxopt.passes.__all__}
    rows = {n: f"| `{n}` | `{m.removeprefix('onnxopt.').replace('.', '/')}.py" for n, m in where.items()}
    assert len(where) >= 9 and all(r in doc for r in rows.values()), [n for n, r in rows.items() if r not in doc]
    imports = _imports(lazy=True)   # a technique module names the pass after it by its kind (pass_protocol)
    users = {m for m, ds in imports.items() if any(d == "onnxopt.passes" or d.startswith("onnxopt.passes.") for d in ds)}
    allowed = {"onnxopt", "onnxopt.api", "onnxopt.presets"}   # the API and presets build recipes of passes
    assert {m for m in users if not m.startswith(("onnxopt.passes", "onnxopt.cli"))} <= allowed


def test_a_technique_is_one_module():
    """Each rewrite's pass is defined in its technique's module (rewrite/, cast/), not in a wrapper beside it;
    passes/ holds only the quantizing passes, and no module name repeats between these folders."""
    import onnxopt.passes
    for name in ("Sparsify", "SmoothQuant", "AWQ", "LowRank", "Autocast"):
        module = getattr(onnxopt.passes, name).__module__
        assert module.split(".")[1] in ("rewrite", "cast"), (name, module)
    for name in ("QDQ", "Int4", "BlockFP", "AutoQuant"):
        assert getattr(onnxopt.passes, name).__module__.startswith("onnxopt.passes."), name
    stems = {d: {p.stem for p in (PKG / d).glob("*.py")} - {"__init__"} for d in ("passes", "rewrite", "cast")}
    assert not stems["passes"] & (stems["rewrite"] | stems["cast"]) and not stems["rewrite"] & stems["cast"]
    top = {p.stem for p in PKG.glob("*.py")}
    assert not top & (stems["rewrite"] | stems["cast"]), top & (stems["rewrite"] | stems["cast"])
