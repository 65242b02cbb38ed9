"""CoSENT (Su Jianlin 2022; used for STS by Conan-Embedding): a pairwise
ranking loss on graded pairs,

    ℓ = log(1 + Σ_{(i, j): y_i > y_j} exp(s_j - s_i))

where s are the student's scaled similarities (cosine·20 in the original,
here <e_q, e_k>/τ) and y the grades. Pairs are formed within each row: one
row per query's candidate group graded by teacher reward, or one row holding
a whole STS batch. Mean over rows.
"""
from __future__ import annotations

import torch

from .base import LossInputs

NEEDS_REWARDS = True


def cosent(scores: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """scores, grades: [R, M]; pairs (i, j) of the same row with grades[i] > grades[j]."""
    differences = scores[:, None, :] - scores[:, :, None]         # [r, i, j] = s_j - s_i
    ordered = grades[:, :, None] > grades[:, None, :]             # y_i > y_j
    logits = differences.masked_fill(~ordered, float("-inf")).flatten(1)
    zero = torch.zeros_like(logits[:, :1])                       # the 1 in log(1 + Σ ...)
    return torch.logsumexp(torch.cat([zero, logits], dim=1), dim=1).mean()


def loss(inputs: LossInputs) -> torch.Tensor:
    return cosent(inputs.group_scores(), inputs.require_rewards("cosent"))
