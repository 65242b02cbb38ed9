"""Problems found in input files, and the policy for them.

Every problem names the file, the line (or row, for Parquet and Hugging Face
datasets) and the field. By default the first problem stops the run with a
`DataError`; with `skip_invalid` the record is dropped and counted, and
`ProblemLog.summary()` says what was dropped, so nothing disappears silently.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from labelers.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is and what is wrong with it."""

    path: str
    line: int | None
    field: str | None
    message: str
    kind: str  # short category for the summary, e.g. "empty text"

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = self.message if self.field is None else f'field "{self.field}": {self.message}'
        return f"{where}: {what}"


class DataError(UsageError):
    """A bad record or file that the user must fix (file:line:field); the CLI prints it on one line and exits 2."""

    def __init__(self, problem: Problem | str):
        super().__init__(str(problem))
        self.problem = problem


@dataclass
class ProblemLog:
    """Collects problems: raises on the first one, or skips and counts them."""

    skip_invalid: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: list[Problem] = field(default_factory=list)

    def report(self, problem: Problem) -> None:
        if not self.skip_invalid:
            raise DataError(problem)
        self.counts[(problem.path, problem.kind)] += 1
        if len(self.examples) < 5:
            self.examples.append(problem)
        logger.debug("skipped %s", problem)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no invalid records"
        per_file: dict[str, list[str]] = {}
        for (path, kind), n in sorted(self.counts.items()):
            per_file.setdefault(path, []).append(f"{kind}: {n}")
        parts = [f"{path} ({', '.join(kinds)})" for path, kinds in per_file.items()]
        return f"skipped {self.total} invalid records: " + "; ".join(parts)
