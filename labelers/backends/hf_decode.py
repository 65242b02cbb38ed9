"""The hf backend's decoding loop: prompt tokens run once, samples drawn row by row, finished rows leave.

`transformers.generate` decodes n samples of a prompt as n rows that each run the whole prompt, and keeps
every row in the batch until the last one ends. For query writing on a CPU both cost most of the time
(prompts of ~400 tokens, answers of ~30). Here:

- the tokens all prompts of a job share (instruction, few-shot block) run once per job (`PrefixCache`);
- each prompt's own tokens run once (one prefill row per prompt, attending over the shared cache), and its
  key/value cache is then repeated for its n samples;
- at each step only the rows still writing are run: a row that meets EOS or a stop string is dropped from
  the batch and from the cache at once (`DynamicCache.batch_select_indices`).

Sampling keeps transformers' semantics (its temperature and top-p warpers, top-k off), with one change that
makes a sample independent of its batch: the draw of row (prompt i, sample j) at each step is the inverse CDF
of one uniform from its own generator, seeded `sampling.prompt_seed(i) + j` as vLLM seeds its samples, instead
of one `torch.multinomial` over the batch from the global generator. So a prompt's samples are the same alone
or in any batch, and the same with or without a stop string up to the stop. They differ bit-for-bit from
`transformers.generate`'s samples (other random draws) and, by float rounding in other batch shapes, a token
may rarely differ between batchings; greedy decoding is the same argmax as `generate`.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .base import Sampling


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


def next_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row: the argmax (greedy), or a draw from softmax of the temperature- and top-p-warped
    logits by the inverse CDF of one uniform from the row's own generator."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits.float())
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    cumulative = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    targets = uniforms.to(cumulative.device, torch.float32)[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, targets).squeeze(1).clamp(max=logits.shape[-1] - 1)


def decode(model, cache_kwarg: str, logits: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor,
           max_new_tokens: int, sampling: Sampling, generators: Sequence[torch.Generator], eos: set[int],
           finished) -> list[list[int]]:
    """New token ids of each row (EOS left out), from the prefill's last `logits` [rows, vocab], its `cache`
    and attention `mask` [rows, width], and each row's next position. `finished(row, ids)` says whether a row
    has met a stop string; such rows, and rows at EOS, leave the batch at once."""
    written: list[list[int]] = [[] for _ in range(len(logits))]
    live = list(range(len(logits)))
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, [generators[r] for r in live]).tolist()
        keep = []
        for k, (row, token) in enumerate(zip(live, chosen)):
            if token in eos:
                continue
            written[row].append(token)
            if not finished(row, written[row]):
                keep.append(k)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            live = [live[k] for k in keep]
        tokens = torch.tensor([[written[r][-1]] for r in live], device=mask.device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions[:, None],
                       **{cache_kwarg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        positions = positions + 1
    return written
