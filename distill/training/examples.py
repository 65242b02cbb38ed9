"""Training examples: one query, its labelled positive, and a pool of candidate negatives.

Read from teacher labels (`distill label`: positives first, then candidates,
each with a reward), from candidates (`distill mine`: negatives without
rewards, i.e. plain triples), or from the qrels alone (pairs; in-batch
negatives only). A candidate that is a positive of the query in the qrels is
never a negative.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import DataError, RetrievalSet
from ..data.records import CandidateRecord, LabelRecord


@dataclass
class Example:
    qid: str
    query: str
    positive: int                      # corpus row of slot 0
    pool: np.ndarray                   # candidate negative rows (int64)
    positive_reward: float | None = None
    pool_rewards: np.ndarray | None = None  # aligned with `pool`
    task: int = 0
    labelled: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (rows, rewards) as read
    positives: np.ndarray | None = field(default=None, repr=False)  # every qrels positive row (masked in-batch)


@dataclass
class ExampleSet:
    examples: list[Example]
    skipped: dict[str, int]            # reason -> count (reported, never silent)


def _positive_rows(rset: RetrievalSet, qid: str) -> np.ndarray:
    return rset.corpus.rows_of(rset.positives(qid))


def teacher_margin(positive_reward: float, negative_rewards: np.ndarray) -> float:
    """m(q) = r(q, d^+) - max_j r(q, d_j^-): how clearly the teacher confirms a query's positive."""
    return float(positive_reward - np.max(negative_rewards))


def examples_from_labels(records: list[LabelRecord], rset: RetrievalSet, path: Path, positive_choice: str,
                         task: int = 0, drop_disputed: bool = False, keep_top_margin: float = 1.0) -> ExampleSet:
    """Labels lines -> examples; slot 0 is the first positive, or with `teacher` the best-rewarded one.

    With `drop_disputed`, a query is left out when its teacher margin m(q) = r(q, d^+) - max_j r(q, d_j^-)
    over its negatives is <= 0: the teacher does not confirm the pair. With `keep_top_margin` = f < 1, only
    the round(f * n) of the n usable queries with the largest m(q) are kept (file order otherwise). For
    generated queries these are the consistency filters InPars-v2 runs with a reranker (Jeronymo et al.,
    2023: the top 10k of 100k synthetic queries by score), here with the labelling LLM and the mined candidates.
    """
    if not 0.0 < keep_top_margin <= 1.0:
        raise ValueError(f"keep_top_margin must be in (0, 1], got {keep_top_margin}")
    texts = dict(zip(rset.queries.ids, rset.queries.texts))
    out, skipped = [], {"not in split": 0, "no negatives": 0, "teacher prefers a negative": 0}
    rows_each = rset.corpus.rows_of_each([list(r.pids) for r in records])
    for record, rows in zip(records, rows_each):
        qid, line_no = record.qid, record.line
        if qid not in rset.qrels:
            skipped["not in split"] += 1
            continue
        if (rows < 0).any():
            bad = record.pids[int(np.argmax(rows < 0))]
            raise DataError(f"{path}:{line_no}: field 'pids': unknown passage id {bad!r}")
        rewards = np.asarray(record.rewards, dtype=np.float64)
        n_pos = record.n_positives
        if n_pos < 1:
            raise DataError(f"{path}:{line_no}: field 'n_positives': the line has no positive")
        chosen = int(np.argmax(rewards[:n_pos])) if positive_choice == "teacher" else 0
        negative = ~np.isin(rows, _positive_rows(rset, qid))
        negative[:n_pos] = False
        if not negative.any():
            skipped["no negatives"] += 1
            continue
        out.append(Example(qid, texts[qid], int(rows[chosen]), rows[negative], float(rewards[chosen]),
                           rewards[negative], task, labelled=(rows[negative], rewards[negative]),
                           positives=np.union1d(_positive_rows(rset, qid), rows[:n_pos])))
    margins = np.array([teacher_margin(e.positive_reward, e.pool_rewards) for e in out])
    keep = np.ones(len(out), dtype=bool)
    if keep_top_margin < 1.0:
        keep[:] = False
        keep[np.argsort(-margins, kind="stable")[:round(keep_top_margin * len(out))]] = True
        skipped["below the teacher-margin cut"] = int((~keep).sum())
    if drop_disputed:
        disputed = keep & (margins <= 0)
        skipped["teacher prefers a negative"] = int(disputed.sum())
        keep &= ~disputed
    return ExampleSet([e for e, k in zip(out, keep) if k], skipped)


def examples_from_candidates(records: list[CandidateRecord], rset: RetrievalSet, task: int = 0) -> ExampleSet:
    """Candidates (negative pids) -> examples without rewards; slot 0 is the first qrels positive."""
    texts = dict(zip(rset.queries.ids, rset.queries.texts))
    out, skipped = [], {"no negatives": 0}
    rows_each = rset.corpus.rows_of_each([list(r.pids) for r in records])
    for qid, rows in zip((r.qid for r in records), rows_each):
        positives = _positive_rows(rset, qid)
        pool = rows[~np.isin(rows, positives)]
        if not len(pool):
            skipped["no negatives"] += 1
            continue
        out.append(Example(qid, texts[qid], int(positives[0]), pool, task=task, positives=positives))
    return ExampleSet(out, skipped)


def examples_from_qrels(rset: RetrievalSet, task: int = 0) -> ExampleSet:
    """(query, first positive) pairs: in-batch negatives only."""
    out = []
    for qid, text in zip(rset.queries.ids, rset.queries.texts):
        positives = _positive_rows(rset, qid)
        if len(positives):
            out.append(Example(qid, text, int(positives[0]), np.empty(0, dtype=np.int64), task=task,
                               positives=positives))
    return ExampleSet(out, {})
