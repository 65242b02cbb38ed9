"""Same-article negatives: other passages of the article a positive comes from
(corpus `doc_id`), drawn uniformly; topical but, by construction, not the
passage that answers. Listed best first when a dense model scores them."""
from __future__ import annotations

import numpy as np

from labelers.errors import UsageError

from .base import Chosen, MiningBatch, CandidateWindow

POOLS = ("same_doc",)


def select(batch: MiningBatch, num: int, params: CandidateWindow) -> list[Chosen]:
    if batch.same_doc is None:
        raise UsageError("the same_doc strategy needs the corpus' doc_id field")
    out = []
    for b in range(len(batch)):
        pool = np.setdiff1d(batch.same_doc[b], batch.excluded[b])
        rows = batch.rngs[b].permutation(pool)[:num].astype(np.int64)
        scores = None
        if batch.score_rows is not None:
            scores = batch.score_rows(b, rows)
            order = np.argsort(-scores, kind="stable")
            rows, scores = rows[order], scores[order]
        out.append(Chosen(rows, scores, ["same_doc"] * len(rows)))
    return out
