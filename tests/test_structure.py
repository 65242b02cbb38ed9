"""The structural facts of issue 21, on the real tree and on a tree planted with each kind of breach."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_structure", ROOT / "scripts" / "check_structure.py")
check_structure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_structure)


def test_the_tree_has_no_import_cycle_and_no_repeated_block():
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
    assert "402 lines" not in problems  # a long module is a warning, not a breach
    assert check_structure.long_modules(tmp_path) == ["labelers/c.py: 402 lines (over 400: does it still have one job?)"]
    assert "distill/d.py:1 and distill/e.py:2 share 6+ lines" in problems


def test_query_path_lists_the_files_a_command_runs_code_in(tiny_bert_dir, small_beir, tmp_path):
    spec = importlib.util.spec_from_file_location("query_path", ROOT / "scripts" / "query_path.py")
    query_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(query_path)
    code, called = query_path.trace(["eval", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--output",
                                     str(tmp_path / "m.json"), "--no-cache", "--no-show-progress"])
    assert code == 0
    names = {str(path.relative_to(ROOT)) for path in called}
    assert {"distill/evaluate.py", "distill/model.py", "distill/metrics.py", "distill/data/retrieval.py"} <= names
    assert not any(n.startswith("labelers/backends/") for n in names)  # eval asks no LLM
    assert "run_generate" not in called.get(ROOT / "distill" / "stages" / "generate.py", set())
    assert "run" in called[ROOT / "distill" / "evaluate.py"]
    printed = query_path.report(called)
    assert "distill.data: " in printed and printed.endswith(f"{len(called)} files, " + printed.split(", ")[-1])


def test_the_readme_names_the_files_of_one_querys_life_and_counts_them_right():
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Life of one query"):readme.index("## Layout")]
    named = set(re.findall(r"`((?:distill|labelers)/[\w/]+\.py)`", section))
    count = int(re.search(r"the (\d+) files named below", section).group(1))
    assert count == len(named) and all((ROOT / n).is_file() for n in named), sorted(named)
