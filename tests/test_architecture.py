"""Imports only go downward through the floors that the README's architecture section draws: a module imports
from floors below it, or from a module to its left on its own floor (never to its right: no cycles)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pneumonia_cnn"
FLOORS = [
    ["errors", "fileio", "device"],
    ["models", "checkpoint", "data", "calibration", "metrics", "plots"],
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
