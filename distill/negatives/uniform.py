"""Random negatives: passages drawn uniformly from the corpus, never an excluded one
(a positive, the query's own text, a passage the teacher rates as high as a positive)."""
from __future__ import annotations

import numpy as np

from .base import Chosen, MiningBatch, CandidateWindow

POOLS: tuple[str, ...] = ()


def draw_uniform(n_rows: int, excluded: np.ndarray | set[int], k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct rows of range(n_rows) uniformly, none excluded (fewer if too few remain)."""
    banned = set(int(r) for r in excluded)
    k = min(k, n_rows - len(banned))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    # k + |banned| distinct rows always hold at least k allowed ones
    draw = rng.choice(n_rows, size=min(n_rows, k + len(banned)), replace=False)
    return np.array([r for r in draw.tolist() if r not in banned][:k], dtype=np.int64)


def select(batch: MiningBatch, num: int, params: CandidateWindow) -> list[Chosen]:
    out = []
    for b in range(len(batch)):
        rows = draw_uniform(batch.corpus_size, batch.excluded[b], num, batch.rngs[b])
        scores = batch.score_rows(b, rows) if batch.score_rows is not None else None
        out.append(Chosen(rows, scores, ["random"] * len(rows)))
    return out
