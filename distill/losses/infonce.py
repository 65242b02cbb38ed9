"""InfoNCE with in-batch and hard negatives (van den Oord et al. 2018; DPR,
Karpukhin et al. 2020; SimCSE, Gao et al. 2021).

    ℓ_b = -log exp(s(q_b, d_b+)) / Σ_{k ∈ batch keys} exp(s(q_b, k))

With k hard negatives per query the key matrix is (k+1)·B wide and query b's
target is column b·(k+1), its positive; every other key (its own hard
negatives, other queries' positives and negatives) is a negative. Mean over
the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LossInputs

NEEDS_REWARDS = False


def info_nce(scores: torch.Tensor, positive_columns: torch.Tensor) -> torch.Tensor:
    """Mean over queries of -log softmax(scores_b)[positive_b]; scores [B, K], positive_columns [B]."""
    return F.cross_entropy(scores, positive_columns)


def loss(inputs: LossInputs) -> torch.Tensor:
    return info_nce(inputs.scores, inputs.group[:, 0])
