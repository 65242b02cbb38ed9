"""Unsupervised SimCSE (Gao et al. 2021, "SimCSE: Simple Contrastive Learning
of Sentence Embeddings"): each passage is encoded twice, each time under its own
dropout masks, and the first view h_i must pick its own second view h_i' among
the batch's second views:

    ℓ_i = -log exp(<h_i, h_i'>/τ) / Σ_j exp(<h_i, h_j'>/τ)

For raw domain text with no queries at all: `distill train --loss simcse` makes
one example per corpus passage, with the passage as its own query and its only
key (a group of one, no mined negatives); the other passages of the batch are
the negatives. Dropout is the only augmentation, so it must be on (the student
is in train mode); with dropout off the two views are equal and this is InfoNCE
between a text and itself.
"""
from __future__ import annotations

import torch

from .base import LossInputs
from .infonce import info_nce

NEEDS_REWARDS = False
PASSAGES_ONLY = True  # trains on the corpus alone: does not combine with the query losses in one run


def simcse(first_view: torch.Tensor, second_view: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """first_view, second_view: [B, d] embeddings of the same B texts (dropout on)."""
    scores = first_view @ second_view.T / temperature
    return info_nce(scores, torch.arange(len(scores), device=scores.device))


def loss(inputs: LossInputs) -> torch.Tensor:
    """`scores` [B, B]: the first views (as queries) against the second views (as keys); column b is b's own."""
    if inputs.group.shape[1] != 1:
        raise ValueError("simcse batches hold each passage once as query and once as key (a group of one)")
    return info_nce(inputs.scores, inputs.group[:, 0])
