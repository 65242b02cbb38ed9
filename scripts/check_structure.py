"""Structural facts the house keeps, checked (tests/test_structure.py runs this; exit 1 lists what is broken):

1. no import cycle between packages: each sub-package (distill.data, .negatives, .losses, .stages, .training,
   labelers.backends) and each top-level module (distill.model, distill.pipeline, labelers.reward, ...) is a
   node, an import is an edge; the graph has no cycle, and `labelers` imports nothing of `distill`;
2. no block of MIN_BLOCK or more identical lines (whitespace aside; blank lines, comments and imports left out)
   in two places of the source tree.

A module over LONG_MODULE lines is a warning, not a breach: a length is a question (does it still have one
job?), and a hard cap made modules lose measured comments and cram lines to fit it. Split along the seams of
the work instead.

python scripts/check_structure.py [--root DIR]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import sys
from collections import defaultdict
from pathlib import Path

LONG_MODULE = 400  # lines: asks whether a module still has one job (a warning)
MIN_BLOCK = 6
PACKAGES = ("distill", "labelers")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def node_of(module: str) -> str:
    """The graph node a module belongs to: its sub-package (distill.data, labelers.backends), or the module itself
    when it sits at the top of a package (distill.pipeline, labelers.reward)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the packages that `name` imports (relative imports resolved; `from x import y` counts x.y when
    y is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in out if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count for repeats."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = " ".join(line.split())
        if not text or text.startswith(("#", "import ", "from ")) or text in (")", "]", "}", '"""'):
            continue
        out.append((number, text))
    return out


def repeated_blocks(paths: list[Path], root: Path) -> list[str]:
    seen: dict[str, tuple[Path, int]] = {}
    found, reported = [], set()
    for path in paths:
        lines = code_lines(path)
        for i in range(len(lines) - MIN_BLOCK + 1):
            window = lines[i:i + MIN_BLOCK]
            key = hashlib.sha1("\n".join(t for _, t in window).encode()).hexdigest()
            where = (path, window[0][0])
            if key in seen and seen[key][0] != path or key in seen and abs(seen[key][1] - where[1]) >= MIN_BLOCK:
                first = seen[key]
                pair = (first[0], path)
                if pair not in reported:
                    reported.add(pair)
                    found.append(f"{first[0].relative_to(root)}:{first[1]} and {path.relative_to(root)}:{where[1]} "
                                 f"share {MIN_BLOCK}+ lines")
            else:
                seen.setdefault(key, where)
    return found


def check(root: Path) -> list[str]:
    problems = []
    found = modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in found.items():
        for target in imports_of(name, path, set(found)):
            a, b = node_of(name), node_of(target)
            if a.startswith("labelers") and b.startswith("distill"):
                problems.append(f"{path.relative_to(root)}: labelers imports {target}")
            if a != b:
                graph[a].add(b)
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    problems += repeated_blocks(sorted(found.values()), root)
    return problems


def long_modules(root: Path) -> list[str]:
    """Warnings: the modules over LONG_MODULE lines."""
    out = []
    for path in modules(root).values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > LONG_MODULE:
            out.append(f"{path.relative_to(root)}: {n} lines (over {LONG_MODULE}: does it still have one job?)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    problems = check(args.root)
    for warning in long_modules(args.root):
        print(f"warning: {warning}")
    for problem in problems:
        print(problem)
    print(f"{len(problems)} structural problems" if problems else "structure: no cycles, no repeats")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
