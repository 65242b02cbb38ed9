"""Typed records of the files the stages write for each other, each read and checked in one place.

A labels file (`distill label`) is read into `LabelRecord`s by `read_labels`:
every line is checked once, with the corpus's error contract (file:line:field,
`DataError`, exit 2), and consumers (training, the teacher filter, reports)
take the records, never raw dicts. Rewards must be finite numbers: one NaN or
infinity in a labels file would otherwise turn the softmax over a group, and
so the whole student, into NaN. A candidates file (`distill mine`) is read by
`read_candidates`, checked against the split and the corpus it belongs to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, Problem
from .sources import iter_jsonl

if TYPE_CHECKING:
    from . import RetrievalSet


@dataclass(frozen=True)
class LabelRecord:
    """One query's candidates with the teacher's reward for each (positives first)."""

    qid: str
    pids: tuple[str, ...]
    rewards: tuple[float, ...]     # log-likelihood per candidate (mean or sum over tokens), aligned with pids
    n_positives: int               # the first n_positives pids are the query's labelled positives
    line: int                      # 1-based line in the labels file
    n_tokens: tuple[int, ...] | None = None
    target: str | None = None      # "answer" | "generated_answer" | "query"
    model: str | None = None
    prompt: str | None = None


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
    for name in ("target", "model", "prompt"):
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise _problem(path, line, name, f"must be a string, got {value!r}")
        text[name] = value
    return LabelRecord(qid, tuple(pids), tuple(float(r) for r in rewards), n_positives, line,
                       None if n_tokens is None else tuple(n_tokens), **text)


def read_labels(path: Path) -> list[LabelRecord]:
    """Every line of a labels file as a checked `LabelRecord`; the first bad line is a `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such labels file")
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


def read_candidates(path: Path, rset: "RetrievalSet") -> list[tuple[str, list[str]]]:
    """(qid, candidate pids) per line of a candidates file, checked against the split and the corpus."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such candidates file")
    out, seen = [], {}
    split_ids = set(rset.qrels)
    for line_no, record in iter_jsonl(path):
        if isinstance(record, Problem):
            raise DataError(record)
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: a candidates line must be a JSON object")
        qid, pids = record.get("qid"), record.get("pids")
        if not isinstance(qid, str) or not qid:
            raise DataError(f"{path}:{line_no}: field 'qid': missing or not a non-empty string")
        if not isinstance(pids, list) or not all(isinstance(p, str) for p in pids):
            raise DataError(f"{path}:{line_no}: field 'pids': must be a list of passage id strings")
        if qid not in split_ids:
            raise DataError(f"{path}:{line_no}: field 'qid': {qid!r} is not a query of split {rset.split!r}")
        if qid in seen:
            raise DataError(f"{path}:{line_no}: field 'qid': {qid!r} repeats line {seen[qid]}")
        rows = rset.corpus.rows_of(pids)
        if (rows < 0).any():
            raise DataError(f"{path}:{line_no}: field 'pids': unknown passage id {pids[int(np.argmax(rows < 0))]!r}")
        seen[qid] = line_no
        out.append((qid, pids))
    return out
