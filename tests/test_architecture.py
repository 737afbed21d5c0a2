"""Imports only go downward through the floors that the README's architecture section draws: a module imports
from floors below it, or from a module to its left on its own floor (never to its right: no cycles). Modules
inside a sub-package import each other without cycles too, and every function and module stays short enough
to read at once."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pneumonia_cnn"
FLOORS = [
    ["errors", "fileio", "device", "builtin", "signals"],
    ["models", "data", "calibration", "checkpoint", "metrics", "plots"],
    ["ood", "tracking", "inference", "training", "explanation"],
    ["info", "evaluation", "monitoring", "serving", "interop", "samples", "predict_io"],
    ["experiment", "adaptation", "demo"],
    ["cli", "__main__", "__init__"],
]
FLOOR_OF = {unit: (floor, place) for floor, units in enumerate(FLOORS) for place, unit in enumerate(units)}


def unit_of(path: Path) -> str:
    """The floor unit of a source file: its top-level module or sub-package name."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(path: Path):
    """(line, unit) for every package-relative import in the file, lazy ones inside functions included."""
    depth_of_file = len(path.relative_to(PACKAGE).parts) - 1
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            if up > depth_of_file:
                continue
            base = list(path.relative_to(PACKAGE).parts[:depth_of_file - up]) if up < depth_of_file else []
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                yield node.lineno, parts[0]
            else:  # "from . import x" at the package root
                for alias in node.names:
                    yield node.lineno, alias.name


def test_every_module_sits_on_a_floor():
    units = {unit_of(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOOR_OF), f"modules missing from FLOORS: {sorted(units - set(FLOOR_OF))}"


def test_imports_only_go_down():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        importer = unit_of(path)
        for line, imported in imported_units(path):
            if imported != importer and FLOOR_OF[imported] >= FLOOR_OF[importer]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line}: {importer} {FLOOR_OF[importer]} imports "
                              f"{imported} {FLOOR_OF[imported]} (floor, place)")
    assert not upward, "\n".join(upward)


def module_of(path: Path) -> tuple[str, ...]:
    """``data/readers.py`` -> ("data", "readers"); a package's ``__init__.py`` -> the package's parts."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def is_module(parts: tuple[str, ...]) -> bool:
    base = PACKAGE.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path):
    """Every package module the file imports (lazy imports included): ``from .x import y`` names the
    submodule ``x.y`` when there is one, else the module ``x``."""
    package = module_of(path) if path.name == "__init__.py" else module_of(path)[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.level) or node.level - 1 > len(package):
            continue
        target = package[:len(package) - (node.level - 1)] + tuple(node.module.split(".") if node.module else ())
        for alias in node.names:
            yield target + (alias.name,) if is_module(target + (alias.name,)) else target


def test_no_import_cycles_between_modules():
    graph = {module_of(path): set(imported_modules(path)) - {module_of(path)} for path in PACKAGE.rglob("*.py")}
    cycles, finished, path = [], set(), []

    def visit(module):
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                cycles.append(" -> ".join(".".join(m) for m in path[path.index(imported):] + [imported]))
            elif imported not in finished:
                visit(imported)
        path.pop()
        finished.add(module)
    for module in sorted(graph):
        if module not in finished:
            visit(module)
    assert not cycles, "\n".join(cycles)


MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 400
# (file relative to the package, function name) -> why it may stay longer for now; keep this list short.
LONG_FUNCTIONS_ALLOWED: dict[tuple[str, str], str] = {}
LONG_MODULES_ALLOWED: dict[str, str] = {}


def long_functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    yield (path.relative_to(PACKAGE).as_posix(), node.name), lines


def test_functions_fit_on_a_screen():
    found = dict(long_functions())
    too_long = [f"{file}::{name} has {lines} lines (limit {MAX_FUNCTION_LINES})"
                for (file, name), lines in found.items() if (file, name) not in LONG_FUNCTIONS_ALLOWED]
    assert not too_long, "\n".join(too_long)
    stale = sorted(set(LONG_FUNCTIONS_ALLOWED) - set(found))
    assert not stale, f"now short enough, remove from LONG_FUNCTIONS_ALLOWED: {stale}"


def test_modules_stay_readable():
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    too_long = [f"{file} has {lines} lines (limit {MAX_MODULE_LINES})" for file, lines in sorted(sizes.items())
                if lines > MAX_MODULE_LINES and file not in LONG_MODULES_ALLOWED]
    assert not too_long, "\n".join(too_long)
    stale = sorted(f for f in LONG_MODULES_ALLOWED if sizes.get(f, 0) <= MAX_MODULE_LINES)
    assert not stale, f"now short enough, remove from LONG_MODULES_ALLOWED: {stale}"
