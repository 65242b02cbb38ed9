"""One training step's maths: the batch's scores and loss, and its backward pass, plain or with GradCache.

For B queries, each with a group of n = 1 + negatives keys (positive in slot 0), every rank embeds its own
share; `batch_loss` gathers all ranks' embeddings (`distributed.gather_with_local_grad`: others' without
gradients) and scores

    s(q, k) = <e_q, e_k> / τ        over every key of the global batch,

with the keys that are a query's own positives masked to -inf (`batches.false_negative_mask`), then applies
the objective (`losses.Objective`) to the [B, B·n] score matrix and the group index of each query.

`forward_backward` runs that loss backward. The texts are embedded in forward passes cut by `microbatch`
(length-sorted runs by default) and put back in batch order. With GradCache (Gao et al., 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup") the texts are embedded chunk by chunk without a graph, the
loss's gradients with respect to those embeddings are computed once, and each chunk is embedded again with
its graph and back-propagated from its slice of those gradients, under the same dropout masks (the torch RNG
state of the first pass is replayed). The gradients equal the plain pass's; only one chunk's activations are
held at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..losses import LossInputs, Objective
from .distributed import Distributed, gather_with_local_grad
from .optim import rng_state, set_rng_state


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops before the bad step changes the weights (`loop.Loop`
    raises it, for `distill train` and `distill pretrain` alike; the CLI exits 1)."""


@dataclass(frozen=True)
class Scoring:
    temperature: float           # τ
    teacher_temperature: float   # T_t in softmax(r / T_t)
    student_temperature: float   # T_s in the KL loss's softmax(s / T_s)
    group_size: int              # n = 1 + negatives per query


@dataclass(frozen=True)
class StepLoss:
    total: torch.Tensor                   # the objective (a scalar with a graph)
    parts: dict[str, float]               # each loss term's value
    negative_scores: torch.Tensor | None  # per query: mean cosine of its negatives (Conan's dynamic re-mining)


def batch_loss(objective: Objective, queries: torch.Tensor, keys: torch.Tensor, rewards: torch.Tensor | None,
               masked: torch.Tensor, scoring: Scoring, ctx: Distributed) -> StepLoss:
    """The global batch's loss from this rank's query and key embeddings (see the module docstring)."""
    q = gather_with_local_grad(queries, ctx)
    k = gather_with_local_grad(keys, ctx)
    scores = (q @ k.T / scoring.temperature).masked_fill(masked, float("-inf"))
    n = scoring.group_size
    group = torch.arange(len(q), device=q.device)[:, None] * n + torch.arange(n, device=q.device)
    inputs = LossInputs(scores, group, rewards, scoring.teacher_temperature, scoring.student_temperature)
    total, parts = objective(inputs)
    negative = (inputs.group_scores()[:, 1:].detach() * scoring.temperature).mean(dim=1) if n > 1 else None
    return StepLoss(total, parts, negative)


def forward_backward(embed: Callable[[np.ndarray], torch.Tensor], chunks: list[np.ndarray], n_queries: int,
                     loss_of: Callable[[torch.Tensor, torch.Tensor], StepLoss],
                     backward: Callable[[torch.Tensor], None], grad_cache: bool,
                     before_backward: Callable[[StepLoss], None] = lambda loss: None) -> StepLoss:
    """Embed, score and back-propagate one batch; gradients accumulate in the encoder, nothing is applied.

    The batch's texts are its `n_queries` queries, then its keys; `chunks` cut them into forward passes (row
    indices, `microbatch`), `embed(rows)` embeds those rows with a graph, and the pieces are put back in batch
    order before `loss_of(q, k)` scores them; `backward(total)` runs the (scaled) backward pass. With `grad_cache`
    the pieces are first embedded without a graph and each chunk is embedded again, under its replayed dropout
    masks, and back-propagated from its slice of the loss's gradients."""
    batch_order = torch.from_numpy(np.argsort(np.concatenate(chunks), kind="stable"))

    def in_batch_order(pieces: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(pieces)[batch_order.to(pieces[0].device)]

    def scored(embedded: torch.Tensor) -> StepLoss:
        loss = loss_of(embedded[:n_queries], embedded[n_queries:])
        before_backward(loss)
        backward(loss.total)
        return loss

    if not grad_cache:
        return scored(in_batch_order([embed(c) for c in chunks]))
    states, pieces = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(rng_state())
            pieces.append(embed(c))
    cached = in_batch_order(pieces).requires_grad_()
    loss = scored(cached)
    after = rng_state()
    for c, state in zip(chunks, states):
        set_rng_state(state)  # the same dropout masks as the cached pass
        embed(c).backward(cached.grad[torch.from_numpy(c).to(cached.device)])
    set_rng_state(after)
    return loss
