"""Soft-label weighted contrastive loss (LLM-Embedder, Zhang et al. 2023,
"Retrieve Anything To Augment Large Language Models", Eq. 3).

Each candidate p of query q's group P(q) is a positive in proportion to the
teacher's preference for it:

    w_p = softmax(r / T_t)_p                     over P(q)
    ℓ_q = Σ_{p ∈ P(q)} -w_p · log exp(s(q,p)) / Σ_{k ∈ batch keys} exp(s(q,k))

The denominator is the full key set (the group and every other query's keys).
Mean over queries.
"""
from __future__ import annotations

import torch

from .base import LossInputs

NEEDS_REWARDS = True


def soft_label_weighted(scores: torch.Tensor, group: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """scores [B, K], group [B, N] columns, weights [B, N] (rows sum to 1)."""
    log_probs = scores.log_softmax(dim=-1).gather(1, group)  # log softmax(s_b)[candidate n]
    return -(weights * log_probs).sum(dim=-1).mean()


def loss(inputs: LossInputs) -> torch.Tensor:
    inputs.require_rewards("soft_label")
    return soft_label_weighted(inputs.scores, inputs.group, inputs.teacher_weights())
