"""The hf backend's decoding loop: prompt tokens run once, samples drawn row by row, finished rows leave.

`transformers.generate` decodes n samples of a prompt as n rows that each run the whole prompt, and keeps
every row in the batch until the last one ends. For query writing on a CPU both cost most of the time
(prompts of ~400 tokens, answers of ~30). Here:

- the tokens all prompts of a job share (instruction, few-shot block) run once per job (`hf_cache.PrefixCache`),
  and a prompt that extends one of the last call's prompts runs only its new tokens (`hf_cache.PromptCache`);
- each prompt's own tokens run once (one prefill row per prompt, attending over the shared cache), in
  length-sorted forward passes that carry little padding (`batching.sorted_chunks`), whose caches are then
  joined into one decoding batch and repeated for each prompt's n samples;
- at each step only the rows still writing are run: a row that meets EOS or a stop string is dropped from
  the batch and from the cache at once (`DynamicCache.batch_select_indices`).

Sampling keeps transformers' semantics (temperature, then its top-p nucleus, top-k off), with one change that
makes a sample independent of its batch: the draw of row (prompt i, sample j) at each step is the inverse CDF
of one uniform from its own generator, seeded `sampling.prompt_seed(i) + j` as vLLM seeds its samples, instead
of one `torch.multinomial` over the batch from the global generator. So a prompt's samples are the same alone
or in any batch, and the same with or without a stop string up to the stop. They differ bit-for-bit from
`transformers.generate`'s samples (other random draws) and, by float rounding in other batch shapes, a token
may rarely differ between batchings; greedy decoding is the same argmax as `generate`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..batching import sorted_chunks
from .base import Sampling
from .hf_cache import PrefixCache, PromptCache


NUCLEUS_CANDIDATES = 256  # tokens searched first for the top-p nucleus (all of them when these hold less than p)


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [rows, k], their probabilities renormalised over the nucleus, 0 outside it), most likely first.

    The nucleus is transformers' `TopPLogitsWarper`'s: the tokens whose more likely tokens hold less than
    `top_p` of the mass. It is searched among the `NUCLEUS_CANDIDATES` most likely tokens, which is exact when
    those hold at least `top_p` (the next token then has at least `top_p` above it); rows where they do not
    are searched over the whole vocabulary."""
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    values, ids = probs.topk(k, dim=-1)
    if k < probs.shape[-1] and bool((values.sum(dim=-1) < top_p).any()):
        values, ids = probs.sort(dim=-1, descending=True)
    above = values.cumsum(dim=-1) - values  # mass of the more likely tokens
    kept = torch.where(above < top_p, values, torch.zeros_like(values))
    kept[:, 0] = values[:, 0]  # at least one token
    return ids, kept / kept.sum(dim=-1, keepdim=True)


def _joinable(model) -> bool:
    """Whether prefill caches can be padded and joined: every layer a plain full-attention cache (a sliding-window
    layer keeps only its last tokens, so its padding would not line up)."""
    from transformers import DynamicCache

    return all(type(layer).__name__ == "DynamicLayer" for layer in DynamicCache(config=model.config).layers)


def prefill(model, cache_kwarg: str, prefixes: PrefixCache, prefix: list[int], own: list[list[int]], pad_id: int,
            token_budget: int, prompts: PromptCache | None = None):
    """Run each row's own tokens after the shared `prefix`: (last logits [rows, vocab], the cache, the attention
    mask [rows, prefix + width], each row's next position), rows in the order given.

    A row whose first tokens are in `prompts` (an earlier call's prompt that this one extends) takes their keys and
    values from there and runs only the rest. Each row is laid out as prefix, padding, stored tokens, padding, new
    tokens; the mask and positions skip the padding. The rows run in forward passes sorted by new tokens under
    `token_budget`, whose caches are padded to the widest and joined. With `prompts`, every row's own tokens are
    kept there for the next call."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    shared = len(prefix)
    joinable = _joinable(model)
    hits = [prompts.lookup(prefix, row) if prompts is not None and joinable else (0, None) for row in own]
    stored = np.array([n for n, _ in hits])
    new = np.array([len(r) for r in own]) - stored
    chunks = sorted_chunks(new, token_budget) if joinable else [np.arange(len(own))]
    width = max(int(stored[chunk].max() + new[chunk].max()) for chunk in chunks)
    logits, masks, positions, caches = [], [], [], []
    for chunk in chunks:
        c, u = int(stored[chunk].max()), int(new[chunk].max())
        ids = torch.full((len(chunk), u), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), shared + c + u), dtype=torch.long)
        mask[:, :shared] = 1
        for r, i in enumerate(chunk):
            ids[r, u - new[i]:] = torch.tensor(own[i][stored[i]:])
            mask[r, shared + c - stored[i]:shared + c] = 1
            mask[r, shared + c + u - new[i]:] = 1
        ids, mask = ids.to(device), mask.to(device)
        position = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = prefixes.rows(prefix, len(chunk))
        cache = DynamicCache(config=model.config) if cache is None else cache
        if c:
            append_stored(cache, [hits[i][1] for i in chunk], c)
        logits.append(model(input_ids=ids, attention_mask=mask, position_ids=position[:, shared + c:],
                            **{cache_kwarg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1])
        if prompts is not None and joinable:
            for r, i in enumerate(chunk):
                columns = torch.nonzero(mask[r, shared:]).squeeze(1) + shared
                prompts.keep(own[i], [(layer.keys[r][:, columns], layer.values[r][:, columns])
                                      for layer in cache.layers])
        gap = width - c - u  # columns of padding that line this pass up with the widest
        masks.append(torch.cat([mask[:, :shared], mask.new_zeros(len(chunk), gap), mask[:, shared:]], dim=1))
        positions.append(position[:, -1] + 1)
        caches.append((cache, gap))
    back = torch.from_numpy(np.argsort(np.concatenate(chunks), kind="stable")).to(device)  # sorted -> given order
    if len(chunks) == 1:
        caches[0][0].batch_select_indices(back)
        return logits[0][back], caches[0][0], masks[0][back], positions[0][back]
    joined = DynamicCache(config=model.config)
    for layer in range(len(caches[0][0].layers)):
        parts = []
        for cache, gap in caches:
            k, v = cache.layers[layer].keys, cache.layers[layer].values
            pad = k.new_zeros(k.shape[0], k.shape[1], gap, k.shape[3])
            parts.append((torch.cat([k[:, :, :shared], pad, k[:, :, shared:]], dim=2),
                          torch.cat([v[:, :, :shared], pad, v[:, :, shared:]], dim=2)))
        joined.update(torch.cat([k for k, _ in parts])[back], torch.cat([v for _, v in parts])[back], layer)
    return torch.cat(logits)[back], joined, torch.cat(masks)[back], torch.cat(positions)[back]


def append_stored(cache, rows: list, width: int) -> None:
    """Append `width` columns to `cache`: each row's stored keys and values (per layer, [heads, n, dim]; None for
    none), right-aligned after zeros."""
    for layer in range(len(cache.layers)):
        like = next(kv for kv in rows if kv is not None)[layer][0]
        keys = like.new_zeros(len(rows), like.shape[0], width, like.shape[2])
        values = torch.zeros_like(keys)
        for r, kv in enumerate(rows):
            if kv is not None:
                n = kv[layer][0].shape[1]
                keys[r, :, width - n:], values[r, :, width - n:] = kv[layer]
        cache.update(keys, values, layer)


def next_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row: the argmax (greedy), or a draw from softmax(logits / temperature) restricted to the
    top-p nucleus, by the inverse CDF of one uniform from the row's own generator."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ids, probs = nucleus(probs, sampling.top_p)
    else:
        ids = None
    cumulative = probs.cumsum(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    targets = uniforms.to(cumulative.device, torch.float32)[:, None] * cumulative[:, -1:]
    picked = torch.searchsorted(cumulative, targets).clamp(max=cumulative.shape[-1] - 1)
    return (picked if ids is None else ids.gather(1, picked)).squeeze(1)


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
