"""What every negative sampler receives and returns.

A sampler sees one chunk of queries at a time (`MiningBatch`): for each query
the corpus rows it must never return (its positives, a passage identical to
its own text, and passages the teacher rated at least as high as a positive),
its RNG, and whatever candidate pools the strategy needs (dense top-K from
faiss, BM25 top-K, same-article rows). It returns, per query, the chosen rows
with their scores and where each came from (`Chosen`).

Scores s(q, d) are the retriever's similarities (cosine for normalised
embeddings). The margin reference s(q, d+) is the query's *lowest* positive
score, the conservative choice sentence-transformers makes too.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from labelers.errors import UsageError


@dataclass
class Ranked:
    """One retriever's candidates for each query of a batch, best first."""

    rows: np.ndarray    # [B, K] int64 corpus rows; -1 = empty slot
    scores: np.ndarray  # [B, K] float32 similarity the list is ranked by


@dataclass
class MiningBatch:
    qids: list[str]
    excluded: list[np.ndarray]             # per query: rows never returned
    rngs: list[np.random.Generator]        # per query, seeded by (seed, qid): see `query_rng`
    corpus_size: int
    positive_scores: np.ndarray | None = None  # [B] s(q, d+) of the lowest-scored positive
    dense: Ranked | None = None
    bm25: Ranked | None = None
    same_doc: list[np.ndarray] | None = None   # per query: rows sharing a positive's doc_id
    # dense s(q_b, d) for any rows (candidates found by BM25, random or same-article draws)
    score_rows: Callable[[int, np.ndarray], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.qids)


@dataclass
class Chosen:
    """One query's negatives, in the order the strategy ranks them."""

    rows: np.ndarray          # int64
    scores: np.ndarray | None  # float32, aligned with rows; None when nothing scores them
    sources: list[str]        # strategy (or pool, for hybrid) each row came from


@dataclass
class CandidateWindow:
    """Settings shared by the samplers; each reads the ones it needs."""

    range_min: int = 0                      # rank window [range_min, range_max) over surviving candidates
    range_max: int = 100
    absolute_margin: float | None = None    # drop d if s(q,d) + m > s(q,d+)
    relative_margin: float | None = None    # drop d if s(q,d) > s(q,d+) - |s(q,d+)|·m
    max_score: float | None = None          # drop d if s(q,d) > max_score
    min_score: float | None = None          # drop d if s(q,d) < min_score
    sampling: str = "top"                   # dense/bm25/hybrid: "top" n of the window or uniform "random"
    simans_a: float = 0.5                   # SimANS: p ∝ exp(-a·(s(q,d) - s(q,d+) - b)²)
    simans_b: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.range_min < self.range_max:
            raise UsageError(f"need 0 <= range_min < range_max, got [{self.range_min}, {self.range_max})")
        if self.sampling not in ("top", "random"):
            raise UsageError(f"sampling must be 'top' or 'random', got {self.sampling!r}")
        if self.simans_a <= 0:
            raise UsageError(f"simans_a must be > 0, got {self.simans_a}")

    @property
    def filters_scores(self) -> bool:
        return any(v is not None for v in (self.absolute_margin, self.relative_margin, self.max_score,
                                           self.min_score))


def query_seed(seed: int, qid: str) -> int:
    """A 64-bit seed from (seed, query id): the same draw whatever the shard or chunk."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{qid}".encode()).digest()[:8], "little")


def query_rng(seed: int, qid: str) -> np.random.Generator:
    return np.random.default_rng(query_seed(seed, qid))
