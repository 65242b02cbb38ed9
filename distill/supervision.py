"""What supervision a `distill run` has, decided out loud from what the data holds (DESIGN: "What supervision
the user has").

| supervision | the data holds                         | positives come from                              |
|-------------|----------------------------------------|--------------------------------------------------|
| `qrels`     | qrels (or `positives`) for the split   | the qrels; the teacher re-weights the pool       |
| `answers`   | queries with reference answers         | the teacher and answer matching, from the pool   |
| `queries`   | queries only (a query log)             | the teacher (query likelihood) and the retriever |
| `raw_text`  | passages only                          | the passage a generated query was written from   |

`auto` takes the first that fits, in that order. A data error (a malformed queries file, a mistyped split) is
never read as "no queries": it stops the run. Each kind sets the stages' defaults, which the YAML sections
override: `answers` and `queries` mine a hybrid (dense + BM25) pool of 16 per query and train with `--positives
answer-match+teacher` or `teacher+retriever`; `queries` also labels with `--target query`, so answers the data
may hold are not scored.
"""
from __future__ import annotations

from dataclasses import dataclass

from labelers.errors import UsageError

from .data import DataError, has_table, load_retrieval_set, resolve_data_dir

SUPERVISIONS = ("auto", "qrels", "answers", "queries", "raw_text")
POOL_SIZE = 16
POOL_STRATEGY = "hybrid"


@dataclass(frozen=True)
class SuppliedData:
    """What the data gives a stage, as far as a setting depends on it: whether the split has qrels, and whether
    its queries' reference answers are there to be used. A stage's `check_against` refuses settings it makes
    impossible or a no-op."""

    labelled: bool
    answers: bool | None  # None: not known at planning time (checks that need to know are left to the stage)
    where: str = "the data"

    @classmethod
    def of(cls, rset) -> SuppliedData:
        """What a loaded `RetrievalSet` gives."""
        return cls(rset.labelled, any(rset.queries.table["answers"].to_pylist()),
                   f"split {rset.split!r} of {rset.queries.path.parent}")


@dataclass(frozen=True)
class Supervision:
    kind: str      # qrels | answers | queries | raw_text
    reason: str    # one line: what in the data made it so

    def stage_defaults(self) -> dict[str, dict]:
        """Settings per YAML section that this supervision implies (the sections' own values come on top)."""
        # label-free pools: hybrid (dense and BM25 interleaved) held the true positive most often at equal size
        # (bench/RESULTS.md, "Pools that hold the positive": squad_dev 98% against dense 95% at 16, scifact 89%
        # against 82%)
        if self.kind == "answers":
            return {"mine": {"pool_size": POOL_SIZE, "strategy": POOL_STRATEGY},
                    "train": {"positives": "answer-match+teacher"}}
        if self.kind == "queries":  # answers, where the data has some, are left unused: query likelihood
            return {"mine": {"pool_size": POOL_SIZE, "strategy": POOL_STRATEGY}, "label": {"target": "query"},
                    "train": {"positives": "teacher+retriever"}}
        return {}

    def supplied(self, data: str) -> SuppliedData:
        """What this supervision gives the stages that train on its data (raw_text: the generated folder, whose
        queries have qrels and answers; queries: answers, if any, left unused)."""
        where = f"supervision {self.kind} of {data}"
        return {"qrels": SuppliedData(True, None, where), "answers": SuppliedData(False, True, where),
                "queries": SuppliedData(False, False, where), "raw_text": SuppliedData(True, True, where)}[self.kind]

    def describe(self, pool_size: int | None = None) -> str:
        """One line; `pool_size` is the mine stage's (a YAML section may change the default)."""
        pool = pool_size or POOL_SIZE
        how = {"qrels": "positives from the qrels; the teacher re-weights the mined pool",
               "answers": f"the teacher picks each positive from the retriever's top {pool}, with answer matching",
               "queries": f"the teacher (query likelihood) and the retriever pick each positive from the top "
                          f"{pool}",
               "raw_text": "the teacher writes questions for the passages first"}[self.kind]
        return f"supervision: {self.kind} ({self.reason}): {how}"


def choose_supervision(data: str, split: str, asked: str = "auto") -> Supervision:
    """The supervision `data`'s `split` gives (or checks that `asked` is possible there)."""
    if asked not in SUPERVISIONS:
        raise UsageError(f"supervision {asked!r} is not known; choose one of {list(SUPERVISIONS)}")
    if asked == "raw_text":
        return Supervision("raw_text", "asked for")
    if not has_table(resolve_data_dir(data), "queries"):
        if asked != "auto":
            raise DataError(f"{data}: holds no queries table, so supervision {asked!r} is not possible; "
                            "use raw_text (or auto)")
        return Supervision("raw_text", f"{data} holds passages only")
    try:
        rset = load_retrieval_set(data, split, unlabelled=True)
    except DataError as exc:
        raise DataError(f"{exc} (to write synthetic queries for this corpus instead, set supervision: raw_text)") \
            from None
    n = len(rset.queries)
    qrels_dir = resolve_data_dir(data) / "qrels"
    others = sorted(p.stem for p in qrels_dir.iterdir() if p.is_file()) if qrels_dir.is_dir() else []
    if not rset.labelled and others and asked == "auto":  # a mistyped split must not become label-free training
        raise DataError(f"{data}: no qrels/{split}.tsv (splits here: {', '.join(others)}); to train on its {n} "
                        "queries that no split judges, without relevance labels, set supervision: answers or queries")
    with_answers = sum(bool(a) for a in rset.queries.table["answers"].to_pylist())
    if rset.labelled:
        found = Supervision("qrels", f"{len(rset.qrels)} {split} queries with qrels")
    elif with_answers:
        found = Supervision("answers", f"{n} {split} queries without qrels, {with_answers} with reference answers")
    else:
        found = Supervision("queries", f"{n} {split} queries without qrels or answers")
    if asked in ("auto", found.kind):
        return found
    if asked == "queries" and found.kind == "answers":  # answers may be left unused
        return Supervision("queries", f"{n} {split} queries without qrels, asked to use no answers")
    raise DataError(f"{data}: supervision {asked!r} asked for, but the data gives {found.kind} ({found.reason})")
