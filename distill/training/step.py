"""One training step's maths: the batch's scores and loss, and its backward pass, plain or with GradCache.

For B queries, each with a group of n = 1 + negatives keys (positive in slot 0), every rank embeds its own
share; `batch_loss` gathers all ranks' embeddings (`distributed.gather_with_local_grad`: others' without
gradients) and scores

    s(q, k) = <e_q, e_k> / τ        over every key of the global batch,

with the keys that are a query's own positives masked to -inf (`batches.false_negative_mask`), then applies
the objective (`losses.Objective`) to the [B, B·n] score matrix and the group index of each query.

`forward_backward` runs that loss backward. With GradCache (Gao et al., 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup") the texts are embedded chunk by chunk without a graph, the
loss's gradients with respect to those embeddings are computed once, and each chunk is embedded again with
its graph and back-propagated from its slice of those gradients, under the same dropout masks (the torch RNG
state of the first pass is replayed). The gradients equal the plain pass's; only one chunk's activations are
held at a time.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..losses import LossInputs, Objective
from .distributed import Distributed, gather_with_local_grad
from .setup import rng_state, set_rng_state


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops before the bad step changes the weights."""


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


def check_finite(loss: StepLoss, describe_stop: Callable[[float, dict], str]) -> None:
    """NonFiniteLoss (with `describe_stop(value, parts)` as its message) when the loss is NaN or infinite."""
    value = float(loss.total.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(describe_stop(value, loss.parts))


def forward_backward(embed: Callable[[list[str], str], torch.Tensor], queries: list[str], keys: list[str],
                     loss_of: Callable[[torch.Tensor, torch.Tensor], StepLoss],
                     backward: Callable[[torch.Tensor], None], chunk: int | None,
                     before_backward: Callable[[StepLoss], None] = lambda loss: None) -> StepLoss:
    """Embed, score and back-propagate one batch; gradients accumulate in the encoder, nothing is applied.

    `embed(texts, kind)` gives embeddings with a graph, `loss_of(q, k)` the batch loss, `backward(total)` runs
    the (scaled) backward pass; `chunk` texts per forward with GradCache, or all at once when None."""
    if not chunk:
        loss = loss_of(embed(queries, "query"), embed(keys, "passage"))
        before_backward(loss)
        backward(loss.total)
        return loss
    cached = {}
    for kind, texts in (("query", queries), ("passage", keys)):
        states, pieces = [], []
        with torch.no_grad():
            for start in range(0, len(texts), chunk):
                states.append(rng_state())
                pieces.append(embed(texts[start:start + chunk], kind))
        cached[kind] = (torch.cat(pieces).requires_grad_(), states)
    loss = loss_of(cached["query"][0], cached["passage"][0])
    before_backward(loss)
    backward(loss.total)
    after = rng_state()
    for kind, texts in (("query", queries), ("passage", keys)):
        reps, states = cached[kind]
        for k, start in enumerate(range(0, len(texts), chunk)):
            set_rng_state(states[k])  # the same dropout masks as the cached pass
            piece = embed(texts[start:start + chunk], kind)
            piece.backward(reps.grad[start:start + chunk])
    set_rng_state(after)
    return loss
