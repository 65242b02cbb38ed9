"""Will a training step fit in memory? Measured before the first step, and GradCache switched on when not.

A step keeps, for the backward pass, every activation autograd saves while the
encoder embeds the batch's B queries and B·(1 + n) passages (n negatives per
query). Those bytes grow with texts x tokens (and with tokens² for attention),
so the default plan (32 queries, groups of 8, 256-token abstracts) needs about
21 GB on all-MiniLM-L6-v2 in fp32, more than many machines have.

Rather than a formula per architecture, `saved_bytes_per_text` measures it: one
forward of two texts at the batch's length, with grad on, under
`torch.autograd.graph.saved_tensors_hooks`, counting the storage of every
tensor autograd keeps that is not a weight or a view of one (each storage once). Texts in one forward
add up linearly at a fixed length, so the step needs about
texts x bytes-per-text (x `SAFETY` for the forward's temporaries).

GradCache (Gao et al., 2021) computes the same gradients while keeping only
one chunk's activations at a time, so when the step does not fit the budget
(a share of free RAM, or of free GPU memory) the trainer turns it on with the
largest chunk that fits, and says so; when not even one text fits it refuses,
naming the settings that help.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from labelers.errors import UsageError

SAFETY = 1.25          # the forward's temporaries above what autograd saves (observed ~1.1-1.2x on BERT, CPU)
DEFAULT_SHARE = 0.6    # of the free memory, for activations; the rest for weights, optimizer, data, the OS


def saved_bytes_per_text(encoder, length: int, dtype: torch.dtype | None = None) -> float:
    """Bytes autograd keeps per text for one `length`-token text of a forward (measured on two texts)."""
    device = encoder.device
    token = encoder.tokenizer.unk_token_id if encoder.tokenizer.unk_token_id is not None else 1
    ids = torch.full((2, length), token, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in encoder.parameters()}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights (and views of them, W.T) are saved too, once per model
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    was_training = encoder.training
    encoder.train()
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                  enabled=False))
    # dropout draws from torch's generator: fork it, so measuring leaves training's random stream as it was
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), autocast, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = encoder(ids, mask)
    del out
    encoder.train(was_training)
    return sum(seen.values()) / 2


def free_memory_bytes(device: torch.device) -> int:
    """Free GPU memory on a CUDA device; on a CPU, the kernel's MemAvailable, or less under a cgroup limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = Path("/sys/fs/cgroup")
    try:  # a container's limit (cgroup v2) can be far below what the host has free
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(int(free), 0)


@dataclass(frozen=True)
class MemoryPlan:
    """How a step's encoder passes are cut so its activations fit `budget_bytes`."""

    step_bytes: float            # activations of the whole step without GradCache
    budget_bytes: float
    chunk_size: int | None       # GradCache chunk to use (None: the whole batch fits)
    texts: int                   # texts a step encodes
    longest_tokens: int         # the longest text a batch may hold (query or passage)

    def describe(self, where: str) -> str:
        gb = 2 ** 30
        return (f"a step embeds {self.texts} texts of up to {self.longest_tokens} tokens: about "
                f"{self.step_bytes / gb:.1f} GiB of activations, over the {self.budget_bytes / gb:.1f} GiB budget "
                f"({where}); GradCache on with chunks of {self.chunk_size} texts (the same gradients; "
                "--grad-cache-chunk-size to choose, --memory-budget-gb to change the budget)")


def plan_memory(*, n_queries: int, n_passages: int, query_bytes: float, passage_bytes: float,
                budget_bytes: float, chunk_size: int | None, longest_tokens: int) -> MemoryPlan:
    """GradCache's chunk for a step of `n_queries` + `n_passages` texts: None when it all fits, the largest
    chunk that fits when not, or ValueError when not even one text fits (or the chunk asked for does not)."""
    texts = n_queries + n_passages
    step = SAFETY * (n_queries * query_bytes + n_passages * passage_bytes)
    per_text = SAFETY * max(query_bytes, passage_bytes)
    hint = ("lower --train-batch-size, --num-negatives or --max-passage-length, or turn on "
            "--gradient-checkpointing")
    if chunk_size:
        if chunk_size * per_text > budget_bytes:
            raise UsageError(f"--grad-cache-chunk-size {chunk_size} needs about {chunk_size * per_text / 2**30:.1f} "
                             f"GiB of activations per chunk, over the {budget_bytes / 2**30:.1f} GiB budget: use "
                             f"--grad-cache-chunk-size {max(int(budget_bytes // per_text), 1)} or less, or {hint}")
        return MemoryPlan(step, budget_bytes, chunk_size, texts, longest_tokens)
    if step <= budget_bytes:
        return MemoryPlan(step, budget_bytes, None, texts, longest_tokens)
    chunk = int(budget_bytes // per_text)
    if chunk < 1:
        raise UsageError(f"one {longest_tokens}-token text needs about {per_text / 2**30:.2f} GiB of activations, "
                         f"over the {budget_bytes / 2**30:.2f} GiB budget, so no --grad-cache-chunk-size fits: {hint}, "
                         "or raise --memory-budget-gb (--train-batch-size does not change this)")
    return MemoryPlan(step, budget_bytes, min(chunk, texts), texts, longest_tokens)


def plan_for_run(encoder, rsets, examples, cfg, n_queries: int, amp: torch.dtype | None,
                 device: torch.device) -> tuple[MemoryPlan, str | None]:
    """A run's plan: measured per-text bytes at its longest texts, its budget (`--memory-budget-gb`, or a share
    of what is free, split between the processes of one machine), and the line to print when GradCache went on."""
    from .inputs import longest_texts

    n_passages = n_queries * (1 + cfg.num_negatives)
    query_tokens, passage_tokens = longest_texts(encoder, rsets, examples, cfg.include_title,
                                                 query_kind=cfg.query_kind())
    per_query = saved_bytes_per_text(encoder, query_tokens, amp)
    per_passage = saved_bytes_per_text(encoder, passage_tokens, amp)
    if cfg.memory_budget_gb is not None:
        budget, where = cfg.memory_budget_gb * 2 ** 30, "--memory-budget-gb"
    else:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
        free = free_memory_bytes(device)
        budget = DEFAULT_SHARE * free / processes
        where = (f"{DEFAULT_SHARE:.0%} of the {free / 2 ** 30:.1f} GiB free "
                 + ("RAM" if device.type == "cpu" else f"on {device}")
                 + (f", shared by {processes} processes" if processes > 1 else ""))
    plan = plan_memory(n_queries=n_queries, n_passages=n_passages, query_bytes=per_query, passage_bytes=per_passage,
                       budget_bytes=budget, chunk_size=cfg.grad_cache_chunk_size,
                       longest_tokens=max(query_tokens, passage_tokens))
    note = plan.describe(where) if plan.chunk_size and not cfg.grad_cache_chunk_size else None
    return plan, note
