"""What every loss receives: the student's scores over one (global) batch.

A batch holds B queries; query b owns a group of N candidate keys (slot 0 its
positive, slots 1..N-1 its negatives) and every other query's keys are extra
in-batch negatives. The student's scores are

    s(q_b, k) = <e_q_b, e_k> / τ           for every key k of the batch,

an array `scores` [B, K] (K = B·N, or more when keys are gathered from other
devices), and `group` [B, N] names the columns of query b's own candidates.
`rewards` [B, N] are the teacher's r for the same candidates (LLM log-probs),
absent for hard-label training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from labelers.errors import UsageError


@dataclass
class LossInputs:
    scores: torch.Tensor                 # [B, K] student scores s(q, k), temperature already applied
    group: torch.Tensor                  # [B, N] int64 columns of each query's candidates; slot 0 = positive
    rewards: torch.Tensor | None = None  # [B, N] teacher rewards aligned with `group`
    teacher_temperature: float = 1.0     # T_t in softmax(r / T_t)
    student_temperature: float = 1.0     # T_s in softmax(s / T_s) (KL only; τ is already in `scores`)

    def group_scores(self) -> torch.Tensor:
        """s(q_b, candidate n): [B, N]."""
        return self.scores.gather(1, self.group)

    def require_rewards(self, loss: str) -> torch.Tensor:
        if self.rewards is None:
            raise UsageError(f"the {loss} loss needs teacher rewards (train with --labels from distill label)")
        return self.rewards

    def teacher_weights(self) -> torch.Tensor:
        """w = softmax(r / T_t) over each query's group: [B, N]."""
        return torch.softmax(self.rewards.to(self.scores.dtype) / self.teacher_temperature, dim=-1)
