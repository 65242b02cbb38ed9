"""SimANS: sample ambiguous negatives (Zhou et al., EMNLP 2022, "SimANS: Simple
Ambiguous Negatives Sampling for Dense Text Retrieval").

Over the query's surviving top-K candidates (same exclusions, filters and
rank window as `dense`), negative d_i is drawn with probability

    p_i ∝ exp(-a · (s(q, d_i) - s(q, d+) - b)²)

without replacement. Sign convention (the paper's): b shifts the peak, which
sits where s(q, d_i) = s(q, d+) + b; b = 0 favours negatives scored like the
positive, b < 0 ones a little below it. Defaults a = 0.5, b = 0 as in the
paper, whose scores are unnormalised dot products (tens of units apart); for
cosine similarities in [-1, 1] a = 0.5 is nearly uniform, so raise a (tens to
hundreds) to make the sampling selective.

Sampling without replacement ∝ p uses the Gumbel-top-k trick (Kool et al.,
ICML 2019): the k largest of log p_i + G_i, G_i ~ Gumbel(0, 1), are
distributed as k sequential draws without replacement.
"""
from __future__ import annotations

import numpy as np

from labelers.errors import UsageError

from .base import Chosen, MiningBatch, CandidateWindow
from .window import surviving_window

POOLS = ("dense",)


def simans_log_probabilities(scores: np.ndarray, positive_score: float, a: float, b: float) -> np.ndarray:
    """log p_i, normalised over the candidates (float64)."""
    logits = -a * (np.asarray(scores, dtype=np.float64) - positive_score - b) ** 2
    return logits - np.logaddexp.reduce(logits) if len(logits) else logits


def sample_without_replacement(log_p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct indices drawn sequentially with probability ∝ exp(log_p), in draw order."""
    k = min(k, len(log_p))
    keys = log_p + rng.gumbel(size=len(log_p))
    top = np.argpartition(-keys, k - 1)[:k] if 0 < k < len(keys) else np.arange(len(keys))[:k]
    return top[np.argsort(-keys[top], kind="stable")]


def select(batch: MiningBatch, num: int, params: CandidateWindow) -> list[Chosen]:
    if batch.dense is None or batch.positive_scores is None:
        raise UsageError("SimANS needs a dense --model (candidate and positive scores)")
    out = []
    for b, (rows, scores) in enumerate(surviving_window(batch, batch.dense, params)):
        log_p = simans_log_probabilities(scores, float(batch.positive_scores[b]), params.simans_a, params.simans_b)
        drawn = sample_without_replacement(log_p, num, batch.rngs[b])
        drawn = drawn[np.argsort(-scores[drawn], kind="stable")]  # report best first
        out.append(Chosen(rows[drawn], scores[drawn], ["simans"] * len(drawn)))
    return out
