"""Rank filtering, the "stabilised distillation" of LLM-Embedder (Zhang et al.
2023; `stable_distill` in FlagEmbedding's llm_embedder code).

The soft-label loss asks every candidate to beat every other, including
candidates the teacher prefers to it, so its gradients pull in opposite
directions. Rank filtering removes that conflict: the labelled positive stays
at slot 0 and the negatives are ordered by the teacher's reward, descending
(ties keep their order). Candidate i's denominator holds itself, the
candidates ranked below it and every key of every other query; those ranked
above it (the positive included) are masked out. The positive keeps the full
denominator. With w = softmax(r / T_t) over the group:

    ℓ_q = Σ_i -w_i · log exp(s(q,c_i)) / (Σ_{j ≥ i} exp(s(q,c_j)) + Σ_{k ∉ P(q)} exp(s(q,k)))

So each candidate only has to beat what the teacher rated lower. Mean over
queries.
"""
from __future__ import annotations

import torch

from .base import LossInputs

NEEDS_REWARDS = True


def teacher_order(rewards: torch.Tensor) -> torch.Tensor:
    """[B, N] slot indices: the positive (slot 0) first, then negatives by reward, descending, ties stable."""
    negatives = torch.argsort(-rewards[:, 1:], dim=-1, stable=True) + 1
    return torch.cat([torch.zeros_like(negatives[:, :1]), negatives], dim=-1)


def rank_filtered(scores: torch.Tensor, group: torch.Tensor, weights: torch.Tensor,
                  order: torch.Tensor) -> torch.Tensor:
    """scores [B, K]; group, weights [B, N] in slot order; order [B, N] slots from best to worst."""
    ranked_columns = group.gather(1, order)             # columns in teacher order
    ranked_weights = weights.gather(1, order)
    batch, size = ranked_columns.shape
    # above[b, i, k]: key k is one of query b's own candidates ranked before position i
    above = torch.zeros(batch, size, scores.shape[1], dtype=torch.bool, device=scores.device)
    earlier = torch.ones(size, size, dtype=torch.bool, device=scores.device).tril(-1)  # [i, j]: j < i
    above.scatter_(2, ranked_columns[:, None, :].expand(batch, size, size), earlier.expand(batch, size, size))
    logits = scores[:, None, :].expand(batch, size, -1).masked_fill(above, float("-inf"))
    log_denominator = torch.logsumexp(logits, dim=-1)    # [B, N]
    log_probs = scores.gather(1, ranked_columns) - log_denominator
    return -(ranked_weights * log_probs).sum(dim=-1).mean()


def loss(inputs: LossInputs) -> torch.Tensor:
    rewards = inputs.require_rewards("rank_filter")
    return rank_filtered(inputs.scores, inputs.group, inputs.teacher_weights(), teacher_order(rewards))
