"""Unsupervised SimCSE (Gao et al. 2021, "SimCSE: Simple Contrastive Learning
of Sentence Embeddings"): each text is encoded twice with different dropout
masks, and each first view must pick its own second view among the batch's:

    ℓ_i = -log exp(<h_i, h_i'>/τ) / Σ_j exp(<h_i, h_j'>/τ)

InfoNCE with a group of one (the text itself) and in-batch negatives only; for
raw domain text with no queries at all.
"""
from __future__ import annotations

import torch

from .base import LossInputs
from .infonce import info_nce

NEEDS_REWARDS = False


def simcse(first_view: torch.Tensor, second_view: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """first_view, second_view: [B, d] embeddings of the same B texts (dropout on)."""
    scores = first_view @ second_view.T / temperature
    return info_nce(scores, torch.arange(len(scores), device=scores.device))


def loss(inputs: LossInputs) -> torch.Tensor:
    """Batches built with each text as its own query and single key (group of one)."""
    if inputs.group.shape[1] != 1:
        raise ValueError("simcse batches hold each text once as query and once as key (a group of one)")
    return info_nce(inputs.scores, inputs.group[:, 0])
