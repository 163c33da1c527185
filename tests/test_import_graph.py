"""The package's import graph: no cycle, and no import from a lower layer to a higher one.

Every module of ``src/fedprune`` is parsed with :mod:`ast` (nothing is imported); every
``import fedprune...`` and ``from fedprune... import ...`` counts, at module level, in a
function, under ``if TYPE_CHECKING:``, and relative ones too. The layers are the fenced
``layers`` block of ``docs/architecture.md``, so the document and the code cannot drift:
a new module must be placed in a layer there.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "fedprune"
DOC = REPO / "docs" / "architecture.md"
ROOT = "fedprune"

# Upward edges (importer, imported) tolerated for now, each with the reason; every entry
# must still exist (remove it once the import is gone).
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = [ROOT, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _target(name: str) -> str:
    """The package module that ``name`` (a module, or an attribute of one) lives in."""
    while name not in modules():
        name = name.rpartition(".")[0]
    return name


def _is_ours(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def imports_of(module: str) -> set[str]:
    """The package modules that ``module`` imports, wherever the import statement is."""
    path = modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(_target(a.name) for a in node.names if _is_ours(a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if not _is_ours(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"  # `from pkg import submodule`
                out.add(sub if sub in modules() else _target(base))
    out.discard(module)
    return out


@cache
def graph() -> dict[str, frozenset[str]]:
    return {m: frozenset(imports_of(m)) for m in modules()}


@cache
def layers() -> list[list[str]]:
    """The ``layers`` block of the architecture document, top layer first.

    Each unindented line is one layer: comma-separated entries, then (after two or more
    spaces) a description; indented lines continue a description. ``x.py`` is the module
    ``fedprune.x``, ``x/`` the package ``fedprune.x`` and everything in it, ``__init__.py``
    the package ``fedprune`` itself.
    """
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^```layers\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"{DOC.name} needs exactly one ```layers block"
    out: list[list[str]] = []
    for line in blocks[0].splitlines():
        if not line.strip() or line[0].isspace():
            continue
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        out.append([n.strip() for n in names.split(",") if n.strip()])
    return out


def _entry_matches(entry: str, module: str) -> bool:
    if entry == "__init__.py":
        return module == ROOT
    if entry.endswith("/"):
        pkg = f"{ROOT}.{entry[:-1].replace('/', '.')}"
        return module == pkg or module.startswith(pkg + ".")
    return module == f"{ROOT}.{entry.removesuffix('.py').replace('/', '.')}"


def layer_of(module: str) -> int:
    """Index of ``module``'s layer (0 is the top)."""
    found = [i for i, layer in enumerate(layers()) for e in layer if _entry_matches(e, module)]
    assert len(found) == 1, f"{module} is in {len(found)} layers of {DOC.name}, expected 1"
    return found[0]


def test_the_graph_sees_imports_everywhere() -> None:
    """Sanity: module-level, function-level and package-relative imports are all edges."""
    g = graph()
    assert "fedprune.experiment" in g["fedprune.cli"]  # inside a function
    assert "fedprune.engines.inprocess" in g["fedprune.experiment"]  # module level
    assert "fedprune.engines.flower" in g["fedprune.experiment"]  # inside a function
    assert "fedprune.models.zoo" in g["fedprune.models.registry"]  # `from pkg import mod`
    assert "fedprune.engines.flower.wire" in g["fedprune.engines.flower.client"]


def test_every_module_is_in_exactly_one_layer() -> None:
    for module in modules():
        layer_of(module)
    for layer in layers():
        for entry in layer:
            assert any(_entry_matches(entry, m) for m in modules()), (
                f"{DOC.name} lists {entry!r}, which is not a module of the package"
            )


def test_no_import_goes_up_a_layer() -> None:
    upward = {
        (a, b) for a, targets in graph().items() for b in targets if layer_of(b) < layer_of(a)
    }
    unexpected = sorted(upward - KNOWN_EXCEPTIONS)
    assert not unexpected, "imports from a lower layer to a higher one:\n" + "\n".join(
        f"  {a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})" for a, b in unexpected
    )
    stale = sorted(KNOWN_EXCEPTIONS - upward)
    assert not stale, f"KNOWN_EXCEPTIONS lists edges that no longer exist: {stale}"


def _find_cycle(g: dict[str, frozenset[str]]) -> list[str] | None:
    """One cycle of ``g`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    g = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}
    assert _find_cycle(g) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": frozenset({"b"}), "b": frozenset()}) is None


@pytest.mark.parametrize(
    ("entry", "module", "expected"),
    [
        ("engines/", "fedprune.engines", True),
        ("engines/", "fedprune.engines.flower.wire", True),
        ("engines/", "fedprune.enginesx", False),
        ("cli.py", "fedprune.cli", True),
        ("__init__.py", "fedprune", True),
        ("__init__.py", "fedprune.core", False),
    ],
)
def test_layer_entries(entry: str, module: str, expected: bool) -> None:
    assert _entry_matches(entry, module) is expected
