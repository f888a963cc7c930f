"""Every part is imported under the one namespace, ``edgefleet.*``.

The repository keeps the parts as top-level folders (``agent/``, ``cloud/``, ...) and
``edgefleet/`` links them; an ``import agent`` would work from the source tree but not
from an installed wheel, and would load a second copy of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("agent", "cloud", "models", "protos", "simulator")


def _python_files() -> list[Path]:
    files: list[Path] = []
    for folder in (*PARTS, "tests", "bench"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def _top_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        bad += [
            f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PARTS
        ]
    return bad


def test_no_module_imports_a_part_outside_the_namespace() -> None:
    bad = [hit for f in _python_files() for hit in _top_level_imports(f)]
    assert not bad, "import these as edgefleet.<part>:\n" + "\n".join(bad)


@pytest.mark.parametrize("part", PARTS)
def test_namespace_links_each_part(part: str) -> None:
    link = ROOT / "edgefleet" / part
    assert link.is_symlink() and link.resolve() == (ROOT / part).resolve()
