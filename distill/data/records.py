"""Typed records of the files the stages write for each other, each read and checked in one place.

A labels file (`distill label`) is read into `LabelRecord`s by `read_labels`:
every line is checked once, with the corpus's error contract (file:line:field,
`DataError`, exit 2), and consumers (training, the teacher filter, reports)
take the records, never raw dicts. Rewards must be finite numbers: one NaN or
infinity in a labels file would otherwise turn the softmax over a group, and
so the whole student, into NaN. A candidates file (`distill mine`) is read by
`read_candidates`, checked against the split and the corpus it belongs to;
generations (`distill generate`), TREC runs (`distill eval --run-file`) and the
training log (`train_log.jsonl`) each have their record and reader here too.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, Problem
from .sources import iter_jsonl, iter_text_lines

if TYPE_CHECKING:
    from .retrieval import RetrievalSet


@dataclass(frozen=True)
class LabelRecord:
    """One query's candidates with the teacher's reward for each (positives first)."""

    qid: str
    pids: tuple[str, ...]
    rewards: tuple[float, ...]     # log-likelihood per candidate (mean or sum over tokens), aligned with pids
    n_positives: int               # the first n_positives pids are the query's labelled positives
    line: int = 0                  # 1-based line in the labels file (0: not read from one)
    n_tokens: tuple[int, ...] | None = None
    target: str | None = None      # "answer" | "generated_answer" | "query"
    model: str | None = None
    prompt: str | None = None
    retriever_scores: tuple[float, ...] | None = None  # queries without qrels: the pool's retriever scores
    answer_index: tuple[int, ...] | None = None        # target "answer": the reference answer of each maximum
    answer: str | None = None                          # target "generated_answer": the teacher's own answer
    normalization: str | None = None                   # "mean" | "sum" over the continuation's tokens
    # `label --signals`: further teacher signals scored in the same pass, by name ("answer", "query",
    # "relevance"), each aligned with pids; `rewards` stays the training signal
    signals: dict[str, tuple[float, ...]] | None = None

    def to_json(self) -> dict:
        """The labels line, as `distill label` writes it (keys in this order; optional ones only when set)."""
        out = {"qid": self.qid, "pids": list(self.pids), "rewards": list(self.rewards),
               "n_tokens": None if self.n_tokens is None else list(self.n_tokens), "n_positives": self.n_positives,
               "target": self.target}
        if self.answer_index is not None:
            out["answer_index"] = list(self.answer_index)
        if self.answer is not None:
            out["answer"] = self.answer
        if self.retriever_scores is not None:
            out["retriever_scores"] = list(self.retriever_scores)
        if self.signals is not None:
            out["signals"] = {name: list(values) for name, values in self.signals.items()}
        out.update(model=self.model, prompt=self.prompt, normalization=self.normalization)
        return out


def _problem(path: Path, line: int, field: str, message: str) -> DataError:
    return DataError(Problem(str(path), line, field, message, "bad labels line"))


def _label_record(path: Path, line: int, raw: dict) -> LabelRecord:
    qid = raw.get("qid")
    if not isinstance(qid, str) or not qid:
        raise _problem(path, line, "qid", "missing or not a non-empty string")
    pids = raw.get("pids")
    if not isinstance(pids, list) or not all(isinstance(p, str) and p for p in pids):
        raise _problem(path, line, "pids", "missing or not a list of passage id strings")
    rewards = raw.get("rewards")
    if not isinstance(rewards, list):
        raise _problem(path, line, "rewards", "missing or not a list of numbers")
    for k, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise _problem(path, line, "rewards", f"item {k} is not a number: {r!r}")
        if not math.isfinite(r):
            raise _problem(path, line, "rewards", f"item {k} is {r} (rewards must be finite log-likelihoods)")
    if len(rewards) != len(pids):
        raise _problem(path, line, "rewards", f"{len(rewards)} rewards for {len(pids)} pids")
    n_positives = raw.get("n_positives")
    if isinstance(n_positives, bool) or not isinstance(n_positives, int) or not 0 <= n_positives <= len(pids):
        raise _problem(path, line, "n_positives", f"must be an integer from 0 to {len(pids)}, got {n_positives!r}")
    n_tokens = raw.get("n_tokens")
    if n_tokens is not None and (not isinstance(n_tokens, list) or len(n_tokens) != len(pids)
                                 or not all(isinstance(n, int) and not isinstance(n, bool) for n in n_tokens)):
        raise _problem(path, line, "n_tokens", f"must be a list of {len(pids)} integers")
    text = {}
    for name in ("target", "model", "prompt", "answer", "normalization"):
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise _problem(path, line, name, f"must be a string, got {value!r}")
        text[name] = value
    retriever_scores = _numbers(path, line, raw, "retriever_scores", len(pids))
    answer_index = raw.get("answer_index")
    if answer_index is not None and (not isinstance(answer_index, list) or len(answer_index) != len(pids) or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in answer_index)):
        raise _problem(path, line, "answer_index", f"must be a list of {len(pids)} integers")
    return LabelRecord(qid, tuple(pids), tuple(float(r) for r in rewards), n_positives, line,
                       None if n_tokens is None else tuple(n_tokens), **text, retriever_scores=retriever_scores,
                       answer_index=None if answer_index is None else tuple(answer_index),
                       signals=_signals(path, line, raw, len(pids)))


def _signals(path: Path, line: int, raw: dict, length: int) -> dict[str, tuple[float, ...]] | None:
    """`signals`: null, or an object of named lists of `length` finite numbers (one per pid)."""
    signals = raw.get("signals")
    if signals is None:
        return None
    if not isinstance(signals, dict) or not signals:
        raise _problem(path, line, "signals", f"must be null or an object of named signals, got {signals!r}"[:200])
    checked = {}
    for name, values in signals.items():
        if not name:
            raise _problem(path, line, "signals", "a signal has an empty name")
        if (not isinstance(values, list) or len(values) != length or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise _problem(path, line, f"signals.{name}", f"must be a list of {length} finite numbers (one per pid), "
                           f"got {values!r}"[:200])
        checked[name] = tuple(float(v) for v in values)
    return checked


def read_labels(path: Path) -> list[LabelRecord]:
    """Every line of a labels file as a checked `LabelRecord`; the first bad line is a `DataError`.

    A process parses and checks a file once (training reads the labels, its model card names their teacher,
    `distill run` runs both): the records of the last files read are kept under the hash of their bytes, which
    is far cheaper to compute than the records (and, unlike a modification time, sees every edit)."""
    from ..files import file_digest

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such labels file")
    return list(_read_labels(path.resolve(), file_digest(path)))


@functools.lru_cache(maxsize=2)
def _read_labels(path: Path, digest: str) -> tuple[LabelRecord, ...]:
    return tuple(_checked_labels(path))


def _checked_labels(path: Path) -> list[LabelRecord]:
    records, seen = [], {}
    for line, raw in iter_jsonl(path):
        if isinstance(raw, Problem):
            raise DataError(raw)
        record = _label_record(path, line, raw)
        if record.qid in seen:
            raise _problem(path, line, "qid", f"{record.qid!r} repeats line {seen[record.qid]}")
        seen[record.qid] = line
        records.append(record)
    return records


@dataclass(frozen=True)
class CandidateRecord:
    """One query's mined candidates (`distill mine`), or a user's own list: only `qid` and `pids` are required."""

    qid: str
    pids: tuple[str, ...]
    line: int = 0                                     # 1-based line in the file (0: not read from one)
    scores: tuple[float, ...] | None = None           # s(q, d) per candidate (dense or BM25, see score_kind)
    score_kind: str | None = None                     # "dense" | "bm25" | None
    source: str | None = None                         # the strategy that chose them
    positives: tuple[str, ...] | None = None          # the query's positives when mined
    positive_scores: tuple[float, ...] | None = None  # s(q, d+) per positive (dense only)
    sources: tuple[str, ...] | None = None            # hybrid: the pool each candidate came from

    def to_json(self) -> dict:
        """The candidates line, as `distill mine` writes it."""
        out = {"qid": self.qid, "pids": list(self.pids), "scores": None if self.scores is None else list(self.scores),
               "score_kind": self.score_kind, "source": self.source}
        if self.sources is not None:
            out["sources"] = list(self.sources)
        out["positives"] = None if self.positives is None else list(self.positives)
        out["positive_scores"] = None if self.positive_scores is None else list(self.positive_scores)
        return out


def _numbers(path: Path, line: int, raw: dict, name: str, length: int) -> tuple[float, ...] | None:
    values = raw.get(name)
    if values is None:
        return None
    if (not isinstance(values, list) or len(values) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise _problem(path, line, name, f"must be null or a list of {length} finite numbers")
    return tuple(float(v) for v in values)


def _ids(path: Path, line: int, raw: dict, name: str, required: bool) -> tuple[str, ...] | None:
    values = raw.get(name)
    if values is None and not required:
        return None
    if not isinstance(values, list) or not all(isinstance(p, str) and p for p in values):
        raise _problem(path, line, name, "must be a list of passage id strings")
    return tuple(values)


def _candidate_record(path: Path, line: int, raw: dict) -> CandidateRecord:
    qid = raw.get("qid")
    if not isinstance(qid, str) or not qid:
        raise _problem(path, line, "qid", "missing or not a non-empty string")
    pids = _ids(path, line, raw, "pids", required=True)
    positives = _ids(path, line, raw, "positives", required=False)
    text = {}
    for name in ("score_kind", "source"):
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise _problem(path, line, name, f"must be a string, got {value!r}")
        text[name] = value
    sources = raw.get("sources")
    if sources is not None and (not isinstance(sources, list) or len(sources) != len(pids)
                                or not all(isinstance(v, str) for v in sources)):
        raise _problem(path, line, "sources", f"must be a list of {len(pids)} strings")
    return CandidateRecord(qid, pids, line, _numbers(path, line, raw, "scores", len(pids)), text["score_kind"],
                           text["source"], positives,
                           _numbers(path, line, raw, "positive_scores", len(positives or ())),
                           None if sources is None else tuple(sources))


def iter_candidates(path: Path) -> Iterator[CandidateRecord]:
    """Each line of a candidates file as a checked `CandidateRecord`, one at a time (exports stream them)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such candidates file")
    for line, raw in iter_jsonl(path):
        if isinstance(raw, Problem):
            raise DataError(raw)
        yield _candidate_record(path, line, raw)


def read_candidates(path: Path, rset: RetrievalSet) -> list[CandidateRecord]:
    """Every line of a candidates file, checked against the split (known query, once) and the corpus (known ids)."""
    path = Path(path)
    out, seen = [], {}
    split_ids = set(rset.queries.ids)
    for record in iter_candidates(path):
        if record.qid not in split_ids:
            raise _problem(path, record.line, "qid", f"{record.qid!r} is not a query of split {rset.split!r}")
        if record.qid in seen:
            raise _problem(path, record.line, "qid", f"{record.qid!r} repeats line {seen[record.qid]}")
        if not record.pids and not rset.positives(record.qid):
            raise _problem(path, record.line, "pids", "is empty, and the query has no qrels positive: the teacher "
                           "has nothing to score (mine with --pool-size >= 1)")
        rows = rset.corpus.rows_of(list(record.pids))
        if (rows < 0).any():
            raise _problem(path, record.line, "pids",
                           f"unknown passage id {record.pids[int(np.argmax(rows < 0))]!r}")
        seen[record.qid] = record.line
        out.append(record)
    return out


@dataclass(frozen=True)
class GeneratedSample:
    """One completion the teacher wrote for a passage, parsed, with the filter that removed it (None: kept so far)."""

    question: str | None
    answer: str | None
    support: float | None      # mean answer log-prob given the passage (the unsupported filter), when scored
    rejected: str | None       # the filter that removed it
    raw: str                   # the completion as sampled
    completed: bool = False    # the answer came from the greedy second pass


@dataclass(frozen=True)
class GenerationRecord:
    """One passage's samples (`distill generate`'s generations.jsonl)."""

    pid: str
    samples: tuple[GeneratedSample, ...]
    line: int = 0                  # 1-based line in the file (0: not read from one)

    def to_json(self) -> dict:
        return {"pid": self.pid, "samples": [
            {"question": s.question, "answer": s.answer, "support": s.support, "rejected": s.rejected, "raw": s.raw,
             **({"completed": True} if s.completed else {})} for s in self.samples]}


def _optional_str(path: Path, line: int, raw: dict, name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise _problem(path, line, name, f"must be a string or null, got {value!r}")
    return value


def read_generations(paths: list[Path]) -> list[GenerationRecord]:
    """Every passage's samples from generations files, in order, each line checked."""
    out = []
    for path in map(Path, paths):
        for line, raw in iter_jsonl(path):
            if isinstance(raw, Problem):
                raise DataError(raw)
            pid, samples = raw.get("pid"), raw.get("samples")
            if not isinstance(pid, str) or not pid:
                raise _problem(path, line, "pid", "missing or not a non-empty string")
            if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
                raise _problem(path, line, "samples", "must be a list of objects")
            checked = []
            for s in samples:
                support = s.get("support")
                if support is not None and (isinstance(support, bool) or not isinstance(support, (int, float))
                                            or not math.isfinite(support)):
                    raise _problem(path, line, "samples", f"support must be null or a finite number, got {support!r}")
                raw_text = s.get("raw")
                if not isinstance(raw_text, str):
                    raise _problem(path, line, "samples", "each sample needs its raw completion (a string)")
                checked.append(GeneratedSample(_optional_str(path, line, s, "question"),
                                               _optional_str(path, line, s, "answer"),
                                               None if support is None else float(support),
                                               _optional_str(path, line, s, "rejected"), raw_text,
                                               bool(s.get("completed", False))))
            out.append(GenerationRecord(pid, tuple(checked), line))
    return out


def ranked(hits: dict[str, list[tuple[str, float]]]) -> dict[str, list[str]]:
    """Passage ids per query by descending score, ties by ascending id (sentence-transformers' order)."""
    return {qid: [pid for pid, _ in sorted(h, key=lambda x: (-x[1], x[0]))] for qid, h in hits.items()}


@dataclass(frozen=True)
class TrecRun:
    """A TREC run file (`qid Q0 pid rank score tag`): each query's (passage, score) pairs as written."""

    path: Path
    hits: dict[str, list[tuple[str, float]]]

    def rankings(self) -> dict[str, list[str]]:
        return ranked(self.hits)


def read_trec_run(path: Path) -> TrecRun:
    """A TREC run file, each line checked (six fields, a numeric score)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such run file")
    hits: dict[str, list[tuple[str, float]]] = {}
    for number, text in iter_text_lines(path):
        if isinstance(text, Problem):
            raise DataError(text)
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise DataError(Problem(str(path), number, None, f"a TREC run line has 6 fields (qid Q0 pid rank "
                                    f"score tag), this one has {len(parts)}", "bad run line"))
        try:
            score = float(parts[4])
        except ValueError:
            raise DataError(Problem(str(path), number, "score", f"not a number: {parts[4]!r}", "bad run line")) from None
        hits.setdefault(parts[0], []).append((parts[2], score))
    return TrecRun(path, hits)


@dataclass(frozen=True)
class TrainLogRecord:
    """One line of a training log (`train_log.jsonl`): a logged step, an evaluation or a re-mining round."""

    kind: str                           # "train" | "eval" | "remine"
    step: int
    line: int
    loss: float | None = None           # train: mean loss over the logged window
    terms: dict | None = None           # train: each loss term
    lr: float | None = None
    epoch: int | None = None
    samples_per_s: float | None = None
    metrics: dict | None = None         # eval: retrieval metrics (None when nothing was evaluated)
    extra: dict | None = None           # remine: reason, examples, changed, seconds


def read_train_log(path: Path) -> list[TrainLogRecord]:
    """A training log's records; an absent log is empty. Losses may be any float (NaN is what stopped a run)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    known = {"kind", "step", "loss", "terms", "lr", "epoch", "samples_per_s", "metrics"}
    for line, raw in iter_jsonl(path):
        if isinstance(raw, Problem):
            raise DataError(raw)
        kind, step = raw.get("kind"), raw.get("step")
        if kind not in ("train", "eval", "remine"):
            raise _problem(path, line, "kind", f"must be train, eval or remine, got {kind!r}")
        if isinstance(step, bool) or not isinstance(step, int):
            raise _problem(path, line, "step", f"must be an integer, got {step!r}")
        extra = {k: v for k, v in raw.items() if k not in known} or None
        out.append(TrainLogRecord(kind, step, line, raw.get("loss"), raw.get("terms"), raw.get("lr"), raw.get("epoch"),
                                  raw.get("samples_per_s"), raw.get("metrics"), extra))
    return out
