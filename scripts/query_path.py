"""Which of the project's modules a `distill` command runs code in: the path a record takes, measured.

Runs one `distill` command line in this process under `sys.setprofile` (every thread) and prints, per package,
the files whose functions were called, with their line counts:

    python scripts/query_path.py run runs/tiny_raw.yaml     # any `distill` arguments

Used for issue 21's "one query's path crosses at most N modules" (README, "Life of one query").
"""
from __future__ import annotations

import sys
import threading
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "labelers", "prompts")


def trace(argv: list[str]) -> tuple[int, dict[Path, set[str]]]:
    """(the command's exit code, {project file: names of the functions called in it})."""
    from distill.cli import main

    called: dict[Path, set[str]] = defaultdict(set)
    roots = tuple(str(ROOT / p) + "/" for p in PACKAGES)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(roots):
            called[Path(frame.f_code.co_filename)].add(frame.f_code.co_name)

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return code, called


def package_of(path: Path) -> str:
    """`distill.training` for distill/training/step.py, `distill` for distill/model.py."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def report(called: dict[Path, set[str]]) -> str:
    by_package: dict[str, list[Path]] = defaultdict(list)
    for path in called:
        by_package[package_of(path)].append(path)
    lines, total = [], 0
    for package in sorted(by_package):
        files = sorted(by_package[package])
        sizes = [len(f.read_text(encoding="utf-8").splitlines()) for f in files]
        total += sum(sizes)
        lines.append(f"{package}: {len(files)} files, {sum(sizes)} lines")
        lines += [f"    {f.name} ({n} lines, {len(called[f])} functions)" for f, n in zip(files, sizes)]
    lines.append(f"{len(by_package)} packages, {len(called)} files, {total} lines")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    exit_code, files_called = trace(sys.argv[1:])
    print(report(files_called))
    sys.exit(exit_code)
