"""Length-sorted micro-batches: one training batch's texts cut into forward passes that carry little padding.

A batch of B queries and B·n passages, padded per kind to its longest text, spends a third or more of the
encoder's work on pad tokens when lengths vary (squad_dev's passages at a 256-token cap: 37%). Here the batch's
texts, queries and passages together, are tokenised once, sorted by token count (longest first) and cut into
runs of that order; each run is one forward pass padded to its own first (longest) text. The cut minimises

    Σ_j (c + w_j · n_j)    subject to  w_j · n_j ≤ budget,

where run j holds n_j texts of at most w_j tokens and c is one forward's fixed cost in tokens: exact dynamic
programming over the sorted lengths, O(N · budget / shortest). The embeddings are put back in batch order, so
the loss sees the same [B, B·n] score matrix and the gradients are the unsorted pass's (to fp32 rounding: pad
columns are masked, and matrix shapes change only the order of sums). Dropout masks are drawn per forward, so
with dropout on they differ from an unsorted pass's; the distribution they are drawn from does not.

On a CPU a forward's throughput peaks at a few thousand tokens (MiniLM fwd+bwd, 2 cores: 1,540 tokens/s at
8 x 256, 1,198 at 16 x 256, 911 at 32 x 256; one call costs ~45 ms, ~64 tokens' worth), so the CPU budget is
2,048 tokens; a GPU wants large calls, 32,768 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labelers.batching import CALL_COST_TOKENS, sorted_chunks  # the cut (shared with the teacher's generation)

DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 32768}


def default_token_budget(device_type: str) -> int:
    """Tokens per forward pass on this kind of device (other accelerators are batched like a GPU)."""
    return DEFAULT_TOKEN_BUDGET.get(device_type, DEFAULT_TOKEN_BUDGET["cuda"])


def kind_chunks(n_queries: int, n_keys: int, chunk: int | None) -> list[np.ndarray]:
    """The unsorted cut: queries, then keys, in batch order, `chunk` texts per forward (all of a kind if None)."""
    out = []
    for start, stop in ((0, n_queries), (n_queries, n_queries + n_keys)):
        step = chunk or max(stop - start, 1)
        out.extend(np.arange(s, min(s + step, stop)) for s in range(start, stop, step))
    return out


@dataclass
class PaddingCount:
    """Tokens a run's forwards carried: the texts' own and all, with padding (for tokens/s and the pad share)."""

    real: int = 0
    padded: int = 0

    def add(self, lengths: np.ndarray, chunks: list[np.ndarray]) -> None:
        self.real += int(lengths.sum())
        self.padded += sum(int(lengths[c].max()) * len(c) for c in chunks if len(c))

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real / self.padded if self.padded else 0.0


__all__ = ["CALL_COST_TOKENS", "PaddingCount", "default_token_budget", "kind_chunks", "sorted_chunks"]
