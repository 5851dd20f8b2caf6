"""The layout the package and the tools keep: no import circles, scripts that are thin entry points
(no sys.path, no script importing another), a remote-code folder without the recipes, and modules
that read in a sitting."""

import ast
import pathlib

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "modeling_performer"
SCRIPTS = ROOT / "scripts"
MAX_LINES = 850
SCRIPT_LINES = 80  # a script is its docstring and a call into modeling_performer.recipes


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, known: set) -> set:
    """The package modules `path` imports anywhere in its body (function-level imports included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known)
    return found - {module_name(path)}


def package_graph() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) for f in files}


def find_cycle(graph: dict):
    """One import circle as a list of modules, or None. A package's __init__ importing its own
    modules is not a circle through them (Python runs it first)."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if node.startswith(target + "."):  # a module naming its own package: the __init__ has run
                continue
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state:
                found = visit(target, trail + [target])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = package_graph()
    assert "modeling_performer.attention_linear" in graph["modeling_performer.attention"]
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    # the check itself finds a circle where there is one
    assert find_cycle({**graph, "modeling_performer.fast_attention": {"modeling_performer.attention_linear"}})


def test_the_models_never_import_the_recipes():
    graph = package_graph()
    seen, todo = set(), ["modeling_performer.modeling_performer"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert "modeling_performer.storage_performer" in seen and "modeling_performer.attention_window" in seen
    assert not [name for name in seen if name.startswith("modeling_performer.recipes")]


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_scripts_are_entry_points_that_neither_touch_sys_path_nor_import_each_other(script):
    tree = ast.parse((SCRIPTS / script).read_text())
    names = {p.stem for p in SCRIPTS.glob("*.py")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name):
            assert node.value.id != "sys", f"{script} touches sys.path (line {node.lineno})"
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & names, f"{script} imports a script"
        if isinstance(node, ast.ImportFrom) and not node.level:
            assert (node.module or "").split(".")[0] not in names, f"{script} imports a script ({node.module})"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")))
def test_every_module_reads_in_a_sitting(path):
    lines = len((ROOT / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines: split it by what its parts do"


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_scripts_are_thin(script):
    """A script is a command's name and description: its steps live in the package, where their
    tests import them (no test loads a script as a module)."""
    lines = len((SCRIPTS / script).read_text().splitlines())
    assert lines <= SCRIPT_LINES, f"scripts/{script} has {lines} lines: move its steps into modeling_performer/recipes"
    imports = [n for n in ast.walk(ast.parse((SCRIPTS / script).read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports and all(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("modeling_performer.recipes")
                           for n in imports), f"scripts/{script} should only call into modeling_performer.recipes"


def test_no_test_loads_a_script_as_a_module():
    """Tests import the package's commands; a script file only ever runs as a command."""
    loader = "spec_from_" + "file_location"
    assert not [p.name for p in (ROOT / "tests").glob("*.py") if loader in p.read_text()]


TESTS = ROOT / "tests"


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"))
def test_every_module_of_the_package_has_a_test_file_named_after_it(module):
    """tests/test_<module>.py holds what that module promises; tests of a feature that spans
    modules (decay, sinks, grouped heads, generation, ...) sit beside them under the feature's name."""
    assert (TESTS / f"test_{module}.py").exists(), f"modeling_performer/{module}.py has no tests/test_{module}.py"


@pytest.mark.parametrize("path", sorted(p.name for p in TESTS.glob("*.py")))
def test_no_test_file_imports_another(path):
    """What tests share lives in conftest.py and helpers.py; a test file is never imported, not even
    by a script a test runs in another process."""
    others = {p.stem for p in TESTS.glob("test_*.py")}
    text = (TESTS / path).read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[-1] not in others, f"{path} imports {node.module} (line {node.lineno})"
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[-1] for a in node.names} & others, f"{path} imports a test file"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for name in others:  # code run in a subprocess, written as a string
                assert f"import {name}" not in node.value and f"tests.{name} import" not in node.value, \
                    f"{path} runs code that imports {name}"
