"""The one interface every LLM backend offers.

A backend scores continuations given prompts, both as token ids from the
teacher's own tokenizer, so that every backend scores the very same tokens:

    score(prompts, continuations) -> [Score(logprob_sum, n_tokens)]
    generate(prompts, max_new_tokens, sampling) -> [[text] * sampling.n]
    close()

where logprob_sum = Σ_i log p(c_i | prompt, c_<i) in nats over the
continuation's tokens. Backends register themselves in `BACKENDS`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from ..errors import UsageError


@dataclass(frozen=True)
class Score:
    """Teacher-forced log-likelihood of one continuation."""

    logprob_sum: float  # nats
    n_tokens: int

    @property
    def logprob_mean(self) -> float:
        return self.logprob_sum / self.n_tokens if self.n_tokens else 0.0


@dataclass(frozen=True)
class Sampling:
    """How `generate` decodes: temperature 0 is greedy; otherwise nucleus sampling (top_p) at that
    temperature, `n` completions per prompt, repeatable for a given seed and call. A completion ends
    before the first of the `stop` strings, which is left out of its text."""

    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.n < 1:
            raise UsageError(f"sampling needs temperature >= 0, 0 < top_p <= 1 and n >= 1, got {self}")
        if self.temperature == 0 and self.n > 1:
            raise UsageError("greedy decoding (temperature 0) gives one completion per prompt; set a temperature")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def prompt_seed(self, index: int) -> int:
        """Seed of prompt `index` in a call. vLLM seeds a prompt's j-th completion with its seed + j, so
        prompts step by n: every (prompt, completion) of a call, and of calls whose seeds step by
        n x their prompt count, draws from its own seed."""
        return self.seed + index * self.n


GREEDY = Sampling()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first of the stop strings; what every backend returns for a stopped completion."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text


class Backend(Protocol):
    name: str

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Score]:
        """Σ log p(continuation | prompt) for each pair, in input order."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY) -> list[list[str]]:
        """`sampling.n` completions of each prompt, as text without special tokens, in input order."""
        ...

    def close(self) -> None:
        """Release the engine, its worker processes and connections; the backend is unusable after."""
        ...


class BackendError(RuntimeError):
    """The backend refused the work (e.g. a server's 4xx); retrying will not help."""


def check_pairs(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> None:
    """Pairs a backend can score: as many prompts as continuations, none empty (an empty call is fine: no
    scores)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        if not len(p) or not len(c):
            raise ValueError(f"pair {i}: prompt and continuation must each have at least one token")
