"""The layer contract (ARCHITECTURE.md): cli -> stages -> pipeline, and stages independent of each other.

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The demo runs the whole pipeline, so it is the one stage allowed to call the others.
COMPOSERS = {"demo"}


def imported_modules(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth (top level, inside functions, under `if`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def layer_violations(package: str, root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / package).glob("*.py")):
        me = path.stem
        for name in imported_modules(path):
            top, _, rest = name.partition(".")
            if top == "cli":
                found.append(f"{package}/{path.name} imports cli")
            if package == "pipeline" and top == "stages":
                found.append(f"pipeline/{path.name} imports {name}: the library knows nothing of the stages")
            if package == "stages" and top == "stages" and rest and me not in COMPOSERS:
                other = rest.split(".")[0]
                if other != me:
                    found.append(f"stages/{path.name} imports {name}: stages compose pipeline pieces, not each other")
    return found


@pytest.mark.parametrize("package", ["pipeline", "stages"])
def test_layers_hold(package: str) -> None:
    assert layer_violations(package) == []


def test_the_checker_sees_a_violation(tmp_path) -> None:
    """The contract test itself can fail: a stage importing another stage, even lazily, is caught."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.py").write_text("def f():\n    from stages.b import g\n    return g\n")
    (tmp_path / "stages" / "demo.py").write_text("from stages.a import f\n")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "x.py").write_text("import stages.a\n")
    stage_problems = layer_violations("stages", tmp_path)
    assert stage_problems and all(p.startswith("stages/a.py imports stages.b") for p in stage_problems)
    assert layer_violations("pipeline", tmp_path) == [
        "pipeline/x.py imports stages.a: the library knows nothing of the stages"]
