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

`compare_paired` says whether one system's per-query scores beat another's:
a bootstrap interval of the mean difference and a randomization-test p-value.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from labelers.errors import UsageError

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


@dataclass(frozen=True)
class PairedComparison:
    """How system B's per-query scores differ from system A's on the same queries."""
    queries: int
    mean_difference: float  # mean over queries of b - a
    low: float              # confidence interval of the mean difference
    high: float
    p_value: float          # two-sided, H0: the difference's sign is exchangeable (no effect)
    confidence: float

    def describe(self, scale: float = 100.0, unit: str = " points") -> str:
        return (f"{scale * self.mean_difference:+.2f}{unit} ({100 * self.confidence:.0f}% CI "
                f"{scale * self.low:+.2f} to {scale * self.high:+.2f}, paired randomization p = "
                f"{self.p_value:.2g}, {self.queries} queries)")


def compare_paired(a: Sequence[float], b: Sequence[float], rng: np.random.Generator, *,
                   confidence: float = 0.95, resamples: int = 9999) -> PairedComparison:
    """Paired significance of b over a, for per-query metrics of two systems on the same queries.

    d_i = b_i - a_i. The interval is the BCa bootstrap interval of mean(d) (Efron 1987; Sakai, SIGIR 2006,
    for IR); the p-value is Fisher's randomization test, which flips the sign of each d_i under H0 (exact
    when 2^n <= resamples) and is the test Smucker, Allan & Carterette (CIKM 2007) recommend for IR.
    Both from scipy.stats.
    """
    from scipy import stats

    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise UsageError(f"need per-query scores of at least 2 queries for both systems, got {d.shape}")
    mean = float(d.mean())
    if np.all(d == d[0]):  # no spread: the interval is the point, and no sign flip can beat a constant
        return PairedComparison(len(d), mean, mean, mean, 1.0 if mean == 0 else 2.0 ** (1 - len(d)), confidence)
    interval = stats.bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=confidence, method="BCa",
                               rng=rng, batch=1000).confidence_interval
    test = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=resamples, rng=rng,
                                  batch=1000)
    return PairedComparison(len(d), mean, float(interval.low), float(interval.high), float(test.pvalue), confidence)
