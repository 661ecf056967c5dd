"""The layout holds: no import cycle among tpshard's modules (imports inside functions included), no
module named like one of the standard library's, package __init__ files that import nothing, and a
core that knows nothing of the terminal."""

import ast
import sys
from pathlib import Path

TPSHARD = Path(__file__).resolve().parent.parent / "tpshard"
TERMINAL = ("typer", "rich", "click")


def module_name(path: Path) -> str:
    parts = path.relative_to(TPSHARD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in TPSHARD.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every module path imports, anywhere in it (inside functions and TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # a module imported by name
    return found


def tpshard_imports(path: Path) -> set[str]:
    return {name for name in imports(path) if name in MODULES and name != module_name(path)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports that comes back to its start, or None."""
    done: set[str] = set()

    def visit(name: str, chain: list[str]) -> list[str] | None:
        if name in chain:
            return [*chain[chain.index(name) :], name]
        if name in done:
            return None
        for imported in sorted(graph.get(name, ())):
            if cycle := visit(imported, [*chain, name]):
                return cycle
        done.add(name)
        return None

    return next((cycle for name in sorted(graph) if (cycle := visit(name, []))), None)


def test_no_import_cycles() -> None:
    graph = {name: tpshard_imports(path) for name, path in MODULES.items()}
    assert len(graph) > 20 and any(graph.values())  # the walk saw the real package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_an_import_cycle_would_be_found(tmp_path: Path) -> None:
    """The check above can fail: a module that imports another inside a function is an edge, and two
    such modules that import each other are a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from tpshard.b import g\n")
    assert {"tpshard.b", "tpshard.b.g"} <= imports(tmp_path / "a.py")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_package_inits_import_nothing_of_tpshard() -> None:
    """Importing tpshard.x.y runs tpshard/x/__init__.py first: an init that imported its package's
    modules would make cycles that the graph above cannot see."""
    for path in MODULES.values():
        if path.name == "__init__.py":
            assert not tpshard_imports(path), f"{path} imports {tpshard_imports(path)}"


def test_no_module_is_named_like_the_standard_librarys() -> None:
    clashes = [
        str(path.relative_to(TPSHARD.parent))
        for path in [*MODULES.values(), *(p for p in TPSHARD.rglob("*") if p.is_dir())]
        if path.stem in sys.stdlib_module_names
    ]
    assert not clashes


def test_the_core_knows_nothing_of_the_terminal() -> None:
    """Only tpshard.cli renders: the core is a library (its facts are dataclasses, its failures one-line errors)."""
    for name, path in MODULES.items():
        if name.startswith("tpshard.cli") or name == "tpshard.__main__":
            continue
        terminal = {i for i in imports(path) if i.split(".")[0] in TERMINAL}
        assert not terminal, f"{path} imports {terminal}"
        assert not any(i.startswith("tpshard.cli") for i in imports(path)), f"{path} imports the CLI"
