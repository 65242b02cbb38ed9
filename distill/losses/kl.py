"""Listwise KL distillation over each query's candidate group (RocketQAv2, Ren
et al. 2021; LLM-Embedder's non-stable distillation):

    ℓ_q = KL( softmax(r / T_t) ‖ softmax(s / T_s) ) = Σ_p t_p (log t_p - log softmax(s / T_s)_p)

over the group only (no in-batch keys). Mean over queries ("batchmean").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LossInputs

NEEDS_REWARDS = True


def kl_distillation(student_scores: torch.Tensor, rewards: torch.Tensor, teacher_temperature: float = 1.0,
                    student_temperature: float = 1.0) -> torch.Tensor:
    """student_scores, rewards: [B, N]."""
    student = F.log_softmax(student_scores / student_temperature, dim=-1)
    teacher = F.log_softmax(rewards.to(student_scores.dtype) / teacher_temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def loss(inputs: LossInputs) -> torch.Tensor:
    rewards = inputs.require_rewards("kl")
    return kl_distillation(inputs.group_scores(), rewards, inputs.teacher_temperature, inputs.student_temperature)
