"""Which candidates may be negatives: exclusions, score filters and the rank window.

The score filters are those of sentence-transformers' `mine_hard_negatives`
(after NV-Retriever, Moreira et al. 2024, "positive-aware" mining), with
s+ = s(q, d+) the query's lowest positive score:

    absolute margin m:  drop d if s(q,d) + m > s+
    relative margin m:  drop d if s(q,d) > s+ - |s+|·m   (= s+·(1-m) for s+ > 0)
    max_score / min_score: drop d if s(q,d) > max_score / < min_score

The rank window [range_min, range_max) then counts ranks among the candidates
that survive, best first, exactly as sentence-transformers does: the first
`range_min` survivors are skipped as likely unlabelled positives.
"""
from __future__ import annotations

import numpy as np

from labelers.errors import UsageError

from .base import CandidateWindow


def excluded_mask(rows: np.ndarray, excluded: list[np.ndarray]) -> np.ndarray:
    """[B, K] True where the row is an empty slot (-1) or one the query must never get."""
    mask = rows < 0
    for b, banned in enumerate(excluded):
        if len(banned):
            mask[b] |= np.isin(rows[b], banned)
    return mask


def score_filter_mask(scores: np.ndarray, positive_scores: np.ndarray | None, params: CandidateWindow) -> np.ndarray:
    """[B, K] True where a score filter drops the candidate."""
    drop = np.zeros(scores.shape, dtype=bool)
    if params.absolute_margin is not None or params.relative_margin is not None:
        if positive_scores is None:
            raise UsageError("margin filters need the positives' scores, i.e. a dense --model")
        positive = np.asarray(positive_scores, dtype=np.float64)[:, None]
        if params.absolute_margin is not None:
            drop |= scores + params.absolute_margin > positive
        if params.relative_margin is not None:
            drop |= scores > positive - np.abs(positive) * params.relative_margin
    if params.max_score is not None:
        drop |= scores > params.max_score
    if params.min_score is not None:
        drop |= scores < params.min_score
    return drop


def rank_window(rows: np.ndarray, scores: np.ndarray, dropped: np.ndarray, range_min: int,
                range_max: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the surviving (rows, scores) at survivor ranks [range_min, range_max), best first.

    `rows`/`scores` are ranked best first; survivors keep that order."""
    out = []
    for b in range(len(rows)):
        keep = np.flatnonzero(~dropped[b])[range_min:range_max]
        out.append((rows[b, keep], scores[b, keep].astype(np.float32)))
    return out


def surviving_window(batch, ranked, params: CandidateWindow) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exclusions, score filters and rank window applied to one pool of a batch."""
    dropped = excluded_mask(ranked.rows, batch.excluded)
    if params.filters_scores:
        dropped |= score_filter_mask(ranked.scores, batch.positive_scores, params)
    return rank_window(ranked.rows, ranked.scores, dropped, params.range_min, params.range_max)
