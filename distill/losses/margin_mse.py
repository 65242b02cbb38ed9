"""MarginMSE (Hofstätter et al. 2020, "Improving Efficient Neural Ranking
Models with Cross-Architecture Knowledge Distillation"): the student's margin
between the positive and each negative regresses onto the teacher's.

    ℓ = mean_{q, n ≥ 1} ( (s(q,c_0) - s(q,c_n)) - (r_0 - r_n) )²

Margins are compared as they are: scale the student's scores with τ (and the
teacher's rewards with their normalisation) so the two ranges match.
"""
from __future__ import annotations

import torch

from .base import LossInputs

NEEDS_REWARDS = True


def margin_mse(student_scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """student_scores, rewards: [B, N], slot 0 the positive."""
    student_margins = student_scores[:, :1] - student_scores[:, 1:]
    teacher_margins = (rewards[:, :1] - rewards[:, 1:]).to(student_scores.dtype)
    return ((student_margins - teacher_margins) ** 2).mean()


def loss(inputs: LossInputs) -> torch.Tensor:
    return margin_mse(inputs.group_scores(), inputs.require_rewards("margin_mse"))
