"""The LLM-aware false-negative filter.

An unlabelled passage the teacher rewards at least as highly as a labelled
positive is more likely an unmarked positive than a negative (the false
negatives RocketQA's denoising and LLM-Embedder's soft labels guard against),
so it is never used as a negative: with r+ the lowest reward among the query's
positives, candidate d is excluded when r(q, d) >= r+.
"""
from __future__ import annotations

from collections.abc import Iterable

from ..data.records import LabelRecord


def teacher_exclusions(labels: Iterable[LabelRecord]) -> dict[str, list[str]]:
    """qid -> candidate pids rewarded >= the query's lowest positive reward, from labels records."""
    out: dict[str, list[str]] = {}
    for record in labels:
        n_pos, rewards, pids = record.n_positives, record.rewards, record.pids
        if n_pos <= 0:
            continue
        threshold = min(rewards[:n_pos])
        out.setdefault(record.qid, []).extend(
            pid for pid, r in zip(pids[n_pos:], rewards[n_pos:]) if r >= threshold)
    return out
