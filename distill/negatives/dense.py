"""Dense hard negatives: the retriever's own top-K, filtered and windowed.

Candidates are the faiss top-K of the query embedding; positives and other
excluded rows, and those the margin / max-score filters drop, are removed;
the rank window [range_min, range_max) is taken over the survivors (see
`filters`); then the first `num` ("top", as in sentence-transformers'
`sampling_strategy="top"`) or `num` uniformly at random ("random").
"""
from __future__ import annotations

import numpy as np

from labelers.errors import UsageError

from .base import Chosen, MiningBatch, CandidateWindow
from .window import surviving_window

POOLS = ("dense",)


def pick(n: int, num: int, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """Positions of the chosen among n ranked survivors, kept in rank order."""
    if sampling == "top" or n <= num:
        return np.arange(min(n, num))
    return np.sort(rng.choice(n, size=num, replace=False))


def select(batch: MiningBatch, num: int, params: CandidateWindow) -> list[Chosen]:
    if batch.dense is None:
        raise UsageError("the dense strategy needs a dense --model")
    out = []
    for b, (rows, scores) in enumerate(surviving_window(batch, batch.dense, params)):
        chosen = pick(len(rows), num, params.sampling, batch.rngs[b])
        out.append(Chosen(rows[chosen], scores[chosen], ["dense"] * len(chosen)))
    return out
