"""The house reads bottom-up (DESIGN.md "Floors"): no module imports one above it, and every `module.name` that
README.md and docs/ point a reader to still exists. Static checks: nothing is trained or run."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom to top; modules on the same floor must not import each other
FLOORS = [("backbones", "data"), ("heads",), ("vla",), ("evaluate", "robot"), ("train",)]
FLOOR = {m: i for i, group in enumerate(FLOORS) for m in group}


def imported_modules(path):
    """Every top-level project module a file imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(FLOOR)


@pytest.mark.parametrize("module", sorted(FLOOR))
def test_module_imports_only_floors_below(module):
    uses = imported_modules(ROOT / f"{module}.py") - {module}
    wrong = sorted(m for m in uses if FLOOR[m] >= FLOOR[module])
    assert not wrong, (f"{module}.py (floor {FLOOR[module]}) imports {wrong}, which are on its own floor or above "
                       f"({FLOORS}): move the shared piece down to where its concept lives")


def test_floor_check_can_fail(tmp_path):
    bad = tmp_path / "heads.py"
    bad.write_text("import torch\n\ndef f():\n    from vla import VLA\n    import data\n")
    assert imported_modules(bad) == {"vla", "data"}


def test_every_module_says_what_it_stands_on():
    for module in FLOOR:
        doc = ast.get_docstring(ast.parse((ROOT / f"{module}.py").read_text()))
        assert doc, f"{module}.py has no opening docstring"


REFERENCE = re.compile(r"\b(backbones|data|heads|vla|evaluate|robot|train)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
CLASS_REFERENCE = re.compile(r"\b([A-Z][A-Za-z0-9]+)\.([a-z_][A-Za-z0-9_]*)\b")


def resolves(obj, dotted):
    """obj.a.b exists; on a class, an instance attribute (a dataclass field, `self.a = ...`) counts too."""
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return isinstance(obj, type) and (name in getattr(obj, "__dataclass_fields__", {})
                                              or f"self.{name} =" in inspect.getsource(obj))
        obj = getattr(obj, name)
    return True


def doc_references():
    """(doc file, module or class, dotted name) for `module.name[.attr]` and `Class.method` in README.md and docs/."""
    modules = {m: importlib.import_module(m) for m in FLOOR}
    classes = {k: v for mod in modules.values() for k, v in vars(mod).items() if isinstance(v, type)
               and v.__module__ == mod.__name__}
    refs = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in REFERENCE.finditer(text):
            dotted = m.group(2)[1:]
            if dotted.split(".")[0] not in ("py", "md"):  # "vla.py" is a file name, not an attribute
                refs.add((path.name, modules[m.group(1)], dotted))
        for m in CLASS_REFERENCE.finditer(text):
            if m.group(1) in classes:
                refs.add((path.name, classes[m.group(1)], m.group(2)))
    return sorted(refs, key=lambda r: (r[0], r[1].__name__, r[2]))


def test_doc_references_resolve():
    """README's paper-to-code map, docs/ and the assignments name functions that exist."""
    refs = doc_references()
    assert len(refs) > 50  # the map and the assignments name many functions: the pattern must find them
    missing = [f"{doc}: {obj.__name__}.{name}" for doc, obj, name in refs if not resolves(obj, name)]
    assert not missing, f"references to names that do not exist: {missing}"
    assert not resolves(importlib.import_module("vla"), "compute_action_stats_that_never_was")
