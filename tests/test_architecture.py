"""The architecture contract that import-linter does not express.

``make lint`` runs import-linter (``[tool.importlinter]`` in
pyproject.toml: the layers, kernels as leaves, reference oracles import
nothing). This file adds two checks and, run as a script, lists what they
find::

    python tests/test_architecture.py

* **no import cycle among nqlib modules**, imports inside functions
  included: the strongly connected components of grimp's module graph;
* **no private name crosses a module boundary**: a name with a leading
  underscore is used only in the module that defines it (within nqlib), and
  the book's chapters use public names only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nqlib"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


# ------------------------------------------------------------------ cycles
def import_cycles() -> list:
    """The import cycles among nqlib modules: each strongly connected
    component of more than one module of the import graph (every import
    statement, at module level or inside a function), sorted."""
    import grimp  # the test extra installs it (with import-linter)

    graph = grimp.build_graph("nqlib", include_external_packages=False)
    adj = {m: sorted(graph.find_modules_directly_imported_by(m))
           for m in graph.modules}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(root):  # Tarjan's algorithm, iteratively
        work = [(root, iter(adj[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(adj[child])))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for m in sorted(adj):
        if m not in index:
            visit(m)
    return sorted(out)


# ---------------------------------------------------------- private names
def _defined_private(tree) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _is_private(n)}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _uses(tree, where: str, module: str, is_package: bool, modules: dict,
          private_defs: dict, own: set) -> list:
    """Private names ``tree`` takes from another nqlib module."""
    found = []
    aliases = {}  # local name -> nqlib module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "nqlib":
                    aliases[a.asname or a.name.split(".")[0]] = (
                        a.name if a.asname else "nqlib")
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, is_package, node)
            if src.split(".")[0] != "nqlib":
                continue
            for a in node.names:
                if f"{src}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{src}.{a.name}"
                elif _is_private(a.name) and src != module:
                    found.append(f"{where}:{node.lineno}: from {src} import "
                                 f"{a.name}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        if isinstance(node.ctx, ast.Store):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        # a dotted chain that starts with an nqlib module alias
        chain, base = [], value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in aliases:
            target = ".".join([aliases[base.id], *reversed(chain)])
            if target != module:
                found.append(f"{where}:{node.lineno}: {target}.{node.attr}")
            continue
        if node.attr in own:
            continue
        owners = sorted(m for m, names in private_defs.items()
                        if node.attr in names and m != module)
        if owners:
            found.append(f"{where}:{node.lineno}: <object>.{node.attr} "
                         f"(defined in {owners[0]})")
    return found


def _cell_source(path: Path) -> str:
    """The Python of a chapter's code cells (IPython magics dropped), one
    cell after the other."""
    import jupytext  # the book extra, which `make test` installs

    cells = [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]
    return "\n\n".join("\n".join(ln for ln in c.splitlines()
                                  if not ln.lstrip().startswith(("%", "!")))
                        for c in cells)


def private_uses() -> list:
    """Every use of a private name across a module boundary: in nqlib's
    modules (names defined by another nqlib module) and in the book's
    chapters (any private name of nqlib)."""
    modules = _modules()
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in modules.items()}
    private_defs = {m: _defined_private(t) for m, t in trees.items()}
    found = []
    for m, tree in trees.items():
        path = modules[m]
        found += _uses(tree, str(path.relative_to(ROOT)), m,
                       path.name == "__init__.py", modules, private_defs,
                       private_defs[m])
    for chapter in sorted((ROOT / "book").glob("[0-9]*.md")):
        tree = ast.parse(_cell_source(chapter), str(chapter))
        found += _uses(tree, str(chapter.relative_to(ROOT)), "__book__", False,
                       modules, private_defs, _defined_private(tree))
    return found


# -------------------------------------------------------------------- tests
def test_no_import_cycles():
    assert import_cycles() == []


def test_no_private_name_crosses_a_module_boundary():
    assert private_uses() == []


def test_the_checks_catch_what_they_look_for():
    """Negative controls: the private-name scan flags an import, a module
    attribute and an object attribute of another module's private name."""
    modules = {"nqlib.a": None, "nqlib.b": None}
    defs = {"nqlib.a": {"_helper", "_cache"}, "nqlib.b": set()}
    src = ("from nqlib.a import _helper\n"
           "from nqlib import a\n"
           "a._helper()\n"
           "def f(obj):\n"
           "    return obj._cache\n")
    found = _uses(ast.parse(src), "b.py", "nqlib.b", False, modules, defs, set())
    assert len(found) == 3, found


if __name__ == "__main__":
    cycles, uses = import_cycles(), private_uses()
    print(f"import cycles among nqlib modules: {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print(f"private names used across module boundaries: {len(uses)}")
    for u in uses:
        print("  " + u)
    sys.exit(1 if cycles or uses else 0)
