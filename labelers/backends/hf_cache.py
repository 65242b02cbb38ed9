"""Key/value caches the hf backend keeps from one `generate` call to the next, as vLLM's automatic prefix caching does.

- `PrefixCache`: the tokens every prompt of a job starts with (chat template, instruction, few-shot block), run
  once per job.
- `PromptCache`: each prompt's own tokens after that start, from the last call. A later call whose prompts extend
  them runs only what is new. `distill generate` asks for the answer of a sample that wrote only a question with
  its sampling prompt + " <question>\\nAnswer:" (`labelers.generation.fill_missing_answers`); from this cache that
  pass runs ~15 tokens a row instead of the ~400-token prompt again.

A reused key/value was computed in another batch shape than a fresh one would be, so logits can differ by float
rounding (as with vLLM's prefix caching); greedy text is the same but for a near tie.
"""
from __future__ import annotations

import copy

import torch

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [heads, tokens, head dim]


class PrefixCache:
    """The key/value cache of a token prefix, computed once and reused while calls share that prefix."""

    def __init__(self, model, cache_kwarg: str):
        self.model, self.cache_kwarg = model, cache_kwarg
        self.tokens: list[int] | None = None
        self.cache = None

    def rows(self, prefix: list[int], rows: int):
        """A fresh cache holding `prefix` for `rows` rows (None for an empty prefix)."""
        if not prefix:
            return None
        if prefix != self.tokens:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            device = next(self.model.parameters()).device
            self.model(input_ids=torch.tensor([prefix], device=device), **{self.cache_kwarg: cache}, use_cache=True)
            self.tokens, self.cache = list(prefix), cache
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


class PromptCache:
    """Keys and values of the last call's prompts, each after the shared prefix it followed, up to `max_bytes`.

    `lookup` finds the longest stored prompt that a new prompt starts with; `keep` stores the prompts of the call
    under way, which replace the stored ones at `commit`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.prefix: list[int] = []
        self.entries: dict[tuple[int, ...], KeyValues] = {}
        self.lengths: list[int] = []  # the stored prompts' distinct lengths, longest first
        self.pending: dict[tuple[int, ...], KeyValues] = {}
        self.pending_bytes = 0

    def covers(self, prompts) -> bool:
        """Whether some of `prompts` extend a stored prompt (all of them then start with its prefix)."""
        n = len(self.prefix)
        if not self.entries or not all(len(p) > n and list(p[:n]) == self.prefix for p in prompts):
            return False
        return any(self.longest(list(p[n:])) for p in prompts)

    def longest(self, own: list[int]) -> int:
        """The length of the longest stored prompt that `own` starts with (0 for none)."""
        return next((n for n in self.lengths if n <= len(own) and tuple(own[:n]) in self.entries), 0)

    def lookup(self, prefix: list[int], own: list[int]) -> tuple[int, KeyValues | None]:
        """(how many leading tokens of `own` are stored after `prefix`, their keys and values); the last token of
        `own` is never taken, since the next-token logits come from running it."""
        found = self.longest(own) if prefix == self.prefix else 0
        n = min(found, len(own) - 1)
        if not n:
            return 0, None
        return n, [(k[:, :n], v[:, :n]) for k, v in self.entries[tuple(own[:found])]]

    def keep(self, own: list[int], key_values: KeyValues) -> None:
        size = sum(k.numel() * k.element_size() * 2 for k, _ in key_values)
        if self.pending_bytes + size <= self.max_bytes:
            self.pending[tuple(own)] = key_values
            self.pending_bytes += size

    def commit(self, prefix: list[int]) -> None:
        """The prompts kept since the last commit (following `prefix`) replace the stored ones."""
        self.prefix, self.entries = list(prefix), self.pending
        self.lengths = sorted({len(k) for k in self.entries}, reverse=True)
        self.pending, self.pending_bytes = {}, 0
