"""Dependencies point one way: types <- envs <- agents <- rollout; learners see types."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "taurl"

# package -> taurl modules it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "types": {"errors"},
    "config": {"errors"},
    "models": {"errors"},
    "envs": {"errors", "types", "config"},
    "agents": {"errors", "types", "config", "envs", "models"},
    "rollout": {"errors", "types", "config", "envs", "agents", "models"},
    "learners": {"errors", "types", "config", "models"},
}
# third-party packages a part must not import
FORBIDDEN = {
    "types": {"torch", "transformers", "vllm", "gymnasium"},
    "envs": {"torch", "transformers", "vllm"},
    "learners": {"vllm", "gymnasium"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path: Path) -> None:
    part = _part(path)
    if part not in ALLOWED:
        return  # top-level integrators (cli, trainer, __init__) may import anything
    for name in _imports(path):
        top, _, rest = name.partition(".")
        if top == "taurl" and rest:
            dep = rest.split(".")[0]
            assert dep == part or dep in ALLOWED[part], (
                f"{path.relative_to(ROOT)} imports taurl.{dep}; {part} may import only "
                f"{sorted(ALLOWED[part])}"
            )
        assert top not in FORBIDDEN.get(part, set()), (
            f"{path.relative_to(ROOT)} imports {top}, which taurl.{part} must not depend on"
        )
