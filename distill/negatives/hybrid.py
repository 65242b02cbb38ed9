"""Hybrid negatives: dense and BM25 candidates together.

Each pool goes through the exclusions, score filters and rank window on its
own (BM25 candidates are filtered on their dense scores), then the two ranked
lists are interleaved, dense first, skipping rows already taken, and the first
`num` kept; so half the negatives are semantic near-misses and half lexical
ones when both pools have enough.
"""
from __future__ import annotations

import numpy as np

from labelers.errors import UsageError

from . import bm25, dense
from .base import Chosen, MiningBatch, CandidateWindow

POOLS = ("dense", "bm25")


def interleave(lists: list[Chosen], num: int) -> Chosen:
    rows, scores, sources, seen = [], [], [], set()
    for i in range(max((len(c.rows) for c in lists), default=0)):
        for c in lists:
            if i < len(c.rows) and int(c.rows[i]) not in seen and len(rows) < num:
                seen.add(int(c.rows[i]))
                rows.append(int(c.rows[i]))
                scores.append(float(c.scores[i]))
                sources.append(c.sources[i])
    return Chosen(np.array(rows, dtype=np.int64), np.array(scores, dtype=np.float32), sources)


def select(batch: MiningBatch, num: int, params: CandidateWindow) -> list[Chosen]:
    if batch.score_rows is None:
        raise UsageError("the hybrid strategy needs a dense --model")
    from_dense = dense.select(batch, num, params)
    from_bm25 = bm25.select(batch, num, params)
    return [interleave([d, s], num) for d, s in zip(from_dense, from_bm25)]
