"""Training examples: one query, its labelled positive, and a pool of candidate negatives.

Read from teacher labels (`distill label`: positives first, then candidates,
each with a reward), from candidates (`distill mine`: negatives without
rewards, i.e. plain triples; or, for queries without qrels, the pool's
retriever top 1 as the positive: self-training), or from the qrels alone (pairs; in-batch
negatives only). A candidate that is a positive of the query in the qrels is
never a negative.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelers.errors import UsageError

from ..data import DataError, RetrievalSet
from ..data.records import CandidateRecord, LabelRecord
from .positives import choose_positive, contains_answer


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


def split_pool(rows: np.ndarray, chosen: int, qrels_rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(the chosen positive's row, the mask of the pool's negatives, the rows masked in-batch): a qrels positive
    of the query is never one of its negatives, whichever passage was chosen."""
    positive = int(rows[chosen])
    negative = (rows != positive) & ~np.isin(rows, qrels_rows)
    return positive, negative, np.union1d(np.array([positive], dtype=np.int64), qrels_rows).astype(np.int64)


def teacher_margin(positive_reward: float, negative_rewards: np.ndarray) -> float:
    """m(q) = r(q, d^+) - max_j r(q, d_j^-): how clearly the teacher confirms a query's positive."""
    return float(positive_reward - np.max(negative_rewards))


@dataclass(frozen=True)
class PositiveChoice:
    """How each labels line gets its slot-0 positive (`positives`), and what happens to mined negatives the
    teacher rewards above the labelled positive (`false_negatives`)."""

    positives: str = "auto"            # auto | one of positives.POSITIVE_MODES
    min_positive_margin: float = 0.0   # z units: less, and a chosen (not qrels) positive is not confident
    false_negatives: str = "keep"      # keep | drop | positive
    false_negative_margin: float = 0.0  # a negative with r > r(d+) + margin is a false negative
    answer_negatives: str = "keep"     # keep | drop: unchosen pool passages that contain a reference answer

    def mode_for(self, labelled: bool, has_answers: bool, has_retriever_scores: bool) -> str:
        """`auto`: the qrels where a line has them; else the answers and the fused score (answer-match+teacher),
        else the fused score (teacher+retriever), or the teacher alone where the pool has no retriever scores."""
        if self.positives != "auto":
            return self.positives
        if labelled:
            return "qrels"
        if has_answers:
            return "answer-match+teacher"
        return "teacher+retriever" if has_retriever_scores else "teacher"


def examples_from_labels(records: list[LabelRecord], rset: RetrievalSet, path: Path, positive_choice: str = "first",
                         task: int = 0, drop_disputed: bool = False, keep_top_margin: float = 1.0,
                         choice: PositiveChoice = PositiveChoice(), include_title: bool = True) -> ExampleSet:
    """Labels lines -> examples.

    Slot 0 is the line's qrels positive (the first, or with `positive_choice` "teacher" the best-rewarded), or,
    for a query without qrels (or any other `choice.positives` mode), the passage of the pool that
    `positives.choose_positive` picks; the rest of the pool are its negatives. Queries without a confident
    choice are left out and counted.

    With `drop_disputed`, a query is left out when its teacher margin m(q) = r(q, d^+) - max_j r(q, d_j^-)
    over its negatives is <= 0: the teacher does not confirm the pair. With `keep_top_margin` = f < 1, only
    the round(f * n) of the n usable queries with the largest m(q) are kept (file order otherwise). For
    generated queries these are the consistency filters InPars-v2 runs with a reranker (Jeronymo et al.,
    2023: the top 10k of 100k synthetic queries by score), here with the labelling LLM and the mined candidates.
    """
    if not 0.0 < keep_top_margin <= 1.0:
        raise UsageError(f"keep_top_margin must be in (0, 1], got {keep_top_margin}")
    table = rset.queries.table
    texts = dict(zip(rset.queries.ids, rset.queries.texts))
    answers_of = dict(zip(table["id"].to_pylist(), table["answers"].to_pylist()))
    out, skipped = [], {"not in split": 0, "no negatives": 0, "teacher prefers a negative": 0}
    chosen_by: dict[str, int] = {}
    rows_each = rset.corpus.rows_of_each([list(r.pids) for r in records])
    for record, rows in zip(records, rows_each):
        qid, line_no = record.qid, record.line
        if qid not in texts:
            skipped["not in split"] += 1
            continue
        if (rows < 0).any():
            bad = record.pids[int(np.argmax(rows < 0))]
            raise DataError(f"{path}:{line_no}: field \"pids\": unknown passage id {bad!r}")
        rewards = np.asarray(record.rewards, dtype=np.float64)
        answers = answers_of.get(qid) or []
        qrels_rows = _positive_rows(rset, qid)
        if record.n_positives == 0 and len(qrels_rows) and choice.positives == "auto":
            raise DataError(f"{path}:{line_no}: field \"n_positives\": query {qid!r} has qrels in --data's split "
                            f"{rset.split!r}, but its labels line lists no positive: the labels were made from data "
                            "without these qrels; label this split again (or name a --positives mode)")
        mode = choice.mode_for(record.n_positives > 0, bool(answers), record.retriever_scores is not None)
        if mode == "qrels":
            found, counts = _qrels_examples(record, rows, rewards, rset, path, positive_choice, choice, task,
                                            texts[qid])
            if not found:
                skipped["no negatives"] += 1
            for reason, count in counts.items():
                skipped[reason] = skipped.get(reason, 0) + count
            out.extend(found)
            continue
        if mode == "answer-match" and not answers:
            raise DataError(f"{path}:{line_no}: query {qid!r} has no reference answers, which --positives {mode} "
                            "matches; use --positives answer-match+teacher, teacher or teacher+retriever")
        matches = None
        if mode.startswith("answer-match"):  # a query without answers matches nothing: the fused score decides
            passages = rset.corpus.passages_at(rows, include_title=include_title) if answers else []
            matches = np.array([contains_answer(p, answers) for p in passages] if answers else [False] * len(rows))
        retriever = None if record.retriever_scores is None else np.asarray(record.retriever_scores)
        picked = choose_positive(mode, rewards, retriever, matches, choice.min_positive_margin)
        if picked.index is None:
            key = f"positive {picked.reason}"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        positive, negative, masked = split_pool(rows, picked.index, qrels_rows)
        if choice.answer_negatives == "drop" and matches is not None:
            # DPR's hard negatives contain no answer; RocketQA drops such likely false negatives (denoising)
            holds_answer = negative & matches
            masked = np.union1d(masked, rows[holds_answer])
            key = "answer-containing negatives dropped"
            skipped[key] = skipped.get(key, 0) + int(holds_answer.sum())
            negative &= ~matches
        if not negative.any():
            skipped["no negatives"] += 1
            continue
        chosen_by[mode] = chosen_by.get(mode, 0) + 1
        out.append(Example(qid, texts[qid], int(positive), rows[negative], float(rewards[picked.index]),
                           rewards[negative], task, labelled=(rows[negative], rewards[negative]),
                           positives=masked))
    for mode, count in chosen_by.items():
        skipped[f"positives chosen by {mode} (kept)"] = count
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


def _qrels_examples(record: LabelRecord, rows: np.ndarray, rewards: np.ndarray, rset: RetrievalSet, path: Path,
                    positive_choice: str, choice: PositiveChoice, task: int,
                    query: str) -> tuple[list[Example], dict[str, int]]:
    """The example(s) of a line with qrels positives: slot 0 a labelled positive, the rest its negatives, with
    the teacher's false negatives kept, dropped or made positives of extra examples (RLHN-style relabelling)."""
    n_pos = record.n_positives
    if n_pos < 1:
        raise DataError(f"{path}:{record.line}: field \"n_positives\": the line has no positive (for queries without "
                        "qrels choose one: --positives teacher, teacher+retriever, answer-match...)")
    chosen = int(np.argmax(rewards[:n_pos])) if positive_choice == "teacher" else 0
    qrels_rows = _positive_rows(rset, record.qid)
    negative = ~np.isin(rows, qrels_rows)
    negative[:n_pos] = False
    found: list[Example] = []
    counts: dict[str, int] = {}
    promoted = np.zeros_like(negative)
    if choice.false_negatives != "keep":
        false = negative & (rewards > rewards[chosen] + choice.false_negative_margin)
        negative &= ~false
        if choice.false_negatives == "positive":
            promoted = false
        key = "false negatives dropped" if choice.false_negatives == "drop" else "false negatives made positives"
        counts[key] = int(false.sum())
    if not negative.any():
        return found, counts
    positives = np.union1d(np.union1d(qrels_rows, rows[:n_pos]), rows[promoted])
    for slot in [chosen, *np.flatnonzero(promoted).tolist()]:
        found.append(Example(record.qid, query, int(rows[slot]), rows[negative], float(rewards[slot]),
                             rewards[negative], task, labelled=(rows[negative], rewards[negative]),
                             positives=positives))
    return found, counts


def examples_from_candidates(records: list[CandidateRecord], rset: RetrievalSet, task: int = 0,
                             positives: str = "qrels", min_positive_margin: float = 0.0,
                             path: Path | None = None) -> ExampleSet:
    """Candidates -> examples without rewards.

    With `positives` "qrels" (or "auto"), slot 0 is the query's first qrels positive and the candidates are its
    negatives (hard labels). With "retriever-top1" (self-training, for queries without qrels), slot 0 is the
    pool's best-scored candidate (`positives.choose_positive`: a tie, or a margin under `min_positive_margin`
    in z units, is no choice and the query is left out, counted) and the rest of the pool are its negatives:
    the examples `examples_from_labels` gives with the same mode on labels of these pools, less the rewards.
    """
    if positives not in ("auto", "qrels", "retriever-top1"):
        raise UsageError(f"--candidates takes --positives qrels (auto) or retriever-top1, not {positives}; the "
                         "other modes need the teacher's rewards: give --labels")
    texts = dict(zip(rset.queries.ids, rset.queries.texts))
    out, skipped = [], {"no negatives": 0}
    chosen = 0
    rows_each = rset.corpus.rows_of_each([list(r.pids) for r in records])
    for record, rows in zip(records, rows_each):
        qid = record.qid
        qrels_rows = _positive_rows(rset, qid)
        if positives != "retriever-top1":
            pool = rows[~np.isin(rows, qrels_rows)]
            if not len(pool):
                skipped["no negatives"] += 1
                continue
            out.append(Example(qid, texts[qid], int(qrels_rows[0]), pool, task=task, positives=qrels_rows))
            continue
        if record.scores is None:
            raise DataError(f"{path or 'candidates'}:{record.line}: field \"scores\": --positives retriever-top1 "
                            "takes each pool's best-scored candidate, and this line has no scores (mine with a "
                            "--model)")
        picked = choose_positive("retriever-top1", np.zeros(len(rows)), np.asarray(record.scores), None,
                                 min_positive_margin)
        if picked.index is None:
            key = f"positive {picked.reason}"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        positive, negative, masked = split_pool(rows, picked.index, qrels_rows)  # as from labels
        if not negative.any():
            skipped["no negatives"] += 1
            continue
        chosen += 1
        out.append(Example(qid, texts[qid], int(positive), rows[negative], task=task, positives=masked))
    if chosen:
        skipped["positives chosen by retriever-top1 (kept)"] = chosen
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


def examples_from_passages(rset: RetrievalSet, task: int = 0, include_title: bool = True) -> ExampleSet:
    """Every corpus passage as its own query and its own positive, without negatives: SimCSE's examples (the
    passage is encoded twice, as query and as key, under different dropout masks)."""
    rows = np.arange(len(rset.corpus), dtype=np.int64)
    texts = rset.corpus.passages_at(rows, include_title)
    ids = rset.corpus.ids_at(rows)
    empty = np.empty(0, dtype=np.int64)
    return ExampleSet([Example(pid, text, int(row), empty, task=task, positives=np.array([row], dtype=np.int64))
                       for pid, text, row in zip(ids, texts, rows)], {})
