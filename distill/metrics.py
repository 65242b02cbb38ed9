"""Retrieval metrics over ranked lists: Recall@k, MRR@k, nDCG@k, MAP@k.

Pure functions of a ranking and a query's qrels `{passage_id: grade}`; a
passage is relevant when its grade is > 0. Ties in score are broken by
ascending passage id, as sentence-transformers' InformationRetrievalEvaluator
does, so both give the same ranking for the same scores.

- Recall@k = |rel ∩ top_k| / |rel|
- MRR@k    = 1 / rank of the first relevant passage in top_k (0 if none)
- nDCG@k   = Σ_{i<k} g(d_i) / log2(i+2)  ÷  the same sum for the ideal ranking,
             with linear gain g = grade (trec_eval's; binary qrels give ST's value)
- MAP@k    = Σ_{i<k, d_i ∈ rel} P@(i+1) / |rel|   (trec_eval's map_cut; equals
             sentence-transformers' MAP@k whenever |rel| ≤ k)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Ranking = Sequence[str]
Qrels = Mapping[str, Mapping[str, int]]


def rank(passage_ids: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Passage ids by descending score, ties by ascending id."""
    return [pid for _, pid in sorted(zip((-float(s) for s in scores), passage_ids))]


def recall_at_k(ranking: Ranking, relevant: Mapping[str, int], k: int) -> float:
    positives = {pid for pid, grade in relevant.items() if grade > 0}
    return sum(pid in positives for pid in ranking[:k]) / len(positives) if positives else 0.0


def mrr_at_k(ranking: Ranking, relevant: Mapping[str, int], k: int) -> float:
    for position, pid in enumerate(ranking[:k]):
        if relevant.get(pid, 0) > 0:
            return 1.0 / (position + 1)
    return 0.0


def ndcg_at_k(ranking: Ranking, relevant: Mapping[str, int], k: int) -> float:
    dcg = sum(max(relevant.get(pid, 0), 0) / math.log2(i + 2) for i, pid in enumerate(ranking[:k]))
    ideal_gains = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(ideal_gains))
    return dcg / ideal if ideal > 0 else 0.0


def average_precision_at_k(ranking: Ranking, relevant: Mapping[str, int], k: int) -> float:
    n_relevant = sum(1 for g in relevant.values() if g > 0)
    hits, total = 0, 0.0
    for position, pid in enumerate(ranking[:k]):
        if relevant.get(pid, 0) > 0:
            hits += 1
            total += hits / (position + 1)
    return total / n_relevant if n_relevant else 0.0


METRICS: dict[str, Callable[[Ranking, Mapping[str, int], int], float]] = {
    "recall": recall_at_k,
    "mrr": mrr_at_k,
    "ndcg": ndcg_at_k,
    "map": average_precision_at_k,
}
# What `distill eval` reports: (metric, k) pairs, in table order.
DEFAULT_CUTOFFS: tuple[tuple[str, int], ...] = (
    ("ndcg", 10), ("mrr", 10), ("recall", 1), ("recall", 5), ("recall", 10), ("recall", 100), ("map", 100))


def per_query_metrics(rankings: Mapping[str, Ranking], qrels: Qrels,
                      cutoffs: Sequence[tuple[str, int]] = DEFAULT_CUTOFFS) -> dict[str, dict[str, float]]:
    """{"ndcg@10": {qid: value}, ...} for every query in `qrels`; a query with no ranking scores 0."""
    return {f"{name}@{k}": {qid: METRICS[name](rankings.get(qid, ()), relevant, k) for qid, relevant in qrels.items()}
            for name, k in cutoffs}


def mean_metrics(rankings: Mapping[str, Ranking], qrels: Qrels,
                 cutoffs: Sequence[tuple[str, int]] = DEFAULT_CUTOFFS) -> dict[str, float]:
    """Each metric averaged over the queries in `qrels` (fractions in [0, 1])."""
    return {name: float(np.mean(list(values.values()))) if values else 0.0
            for name, values in per_query_metrics(rankings, qrels, cutoffs).items()}
