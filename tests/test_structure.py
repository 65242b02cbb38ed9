"""The structural facts of issue 21, on the real tree and on a tree planted with each kind of breach."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_structure", ROOT / "scripts" / "check_structure.py")
check_structure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_structure)


def test_the_tree_has_no_import_cycle_no_long_module_and_no_repeated_block():
    assert check_structure.check(ROOT) == []


def test_each_breach_is_found(tmp_path):
    for package in ("distill/data", "distill/stages", "labelers"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "distill" / "__init__.py").write_text("")
    (tmp_path / "distill/data/a.py").write_text("from ..stages import b\n")
    (tmp_path / "distill/stages/b.py").write_text("from ..data import a\n")
    (tmp_path / "labelers/c.py").write_text("from distill.data import a\n" + "x = 1\n" * 401)
    block = "".join(f"value_{i} = compute({i}, 'same')\n" for i in range(6))
    (tmp_path / "distill/d.py").write_text(block)
    (tmp_path / "distill/e.py").write_text("y = 2\n" + block)
    problems = "\n".join(check_structure.check(tmp_path))
    assert "import cycle: distill.data -> distill.stages -> distill.data" in problems
    assert "labelers/c.py: labelers imports distill.data" in problems
    assert "labelers/c.py: 402 lines (over 400)" in problems
    assert "distill/d.py:1 and distill/e.py:2 share 6+ lines" in problems
