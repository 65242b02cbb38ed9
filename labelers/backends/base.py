"""The one interface every LLM backend offers.

A backend scores continuations given prompts, both as token ids from the
teacher's own tokenizer, so that every backend scores the very same tokens:

    score(prompts, continuations) -> [Score(logprob_sum, n_tokens)]
    generate(prompts, max_new_tokens) -> [text]          (greedy)
    close()

where logprob_sum = Σ_i log p(c_i | prompt, c_<i) in nats over the
continuation's tokens. Backends register themselves in `BACKENDS`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Score:
    """Teacher-forced log-likelihood of one continuation."""

    logprob_sum: float  # nats
    n_tokens: int

    @property
    def logprob_mean(self) -> float:
        return self.logprob_sum / self.n_tokens if self.n_tokens else 0.0


class Backend(Protocol):
    name: str

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Score]:
        """Σ log p(continuation | prompt) for each pair, in input order."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
        """Greedy completion of each prompt, as text without special tokens."""
        ...

    def close(self) -> None:
        """Release the engine, its worker processes and connections; the backend is unusable after."""
        ...


class BackendError(RuntimeError):
    """The backend refused the work (e.g. a server's 4xx); retrying will not help."""


def check_pairs(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> None:
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        if not len(p) or not len(c):
            raise ValueError(f"pair {i}: prompt and continuation must each have at least one token")
