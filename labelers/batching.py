"""How sequences of different lengths are cut into batches (forward passes), for the teacher and the student.

- `length_buckets`: greedy, longest first, each batch's rows x longest <= a token budget (the teacher's scoring).
- `sorted_chunks`: the cheapest cut of the longest-first order, Σ_j (c + w_j · n_j) subject to w_j · n_j <= the
  budget, where batch j holds n_j sequences of at most w_j tokens and c is one forward's fixed cost in tokens:
  exact dynamic programming over the sorted lengths, O(N · budget / shortest). (Training's micro-batches and
  the teacher's generation prefill.)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CALL_COST_TOKENS = 64  # c: one forward's fixed cost on a CPU, in tokens (MiniLM, 2 cores: ~45 ms, ~64 tokens' worth)


def length_buckets(lengths: Sequence[int], token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Indices grouped into batches: longest first, each batch's rows x longest <= token_budget.

    A single sequence longer than the budget gets a batch of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, width = [], [], 0
    for i in order:
        new_width = max(width, lengths[i])
        if current and (new_width * (len(current) + 1) > token_budget or len(current) >= max_rows):
            batches.append(np.array(current))
            current, new_width = [], lengths[i]
        current.append(int(i))
        width = new_width
    if current:
        batches.append(np.array(current))
    return batches


def sorted_chunks(lengths: np.ndarray, token_budget: int, call_cost: int = CALL_COST_TOKENS) -> list[np.ndarray]:
    """Row indices of each forward pass: runs of the texts sorted longest first, cut to minimise
    Σ (call_cost + longest · texts) with longest · texts ≤ token_budget (a text longer than the budget runs alone).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    width = lengths[order]
    n = len(width)
    best = np.zeros(n + 1)               # best[i]: the cheapest cut of the sorted texts i..n-1
    take = np.zeros(n, dtype=np.int64)   # take[i]: texts in the run that starts at i
    for i in range(n - 1, -1, -1):
        counts = np.arange(1, max(1, min(n - i, token_budget // max(int(width[i]), 1))) + 1)
        costs = call_cost + width[i] * counts + best[i + counts]
        k = int(np.argmin(costs))
        best[i], take[i] = costs[k], counts[k]
    chunks, i = [], 0
    while i < n:
        chunks.append(order[i:i + take[i]])
        i += int(take[i])
    return chunks
