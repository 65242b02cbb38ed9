"""Negative mining strategies, one module each, one interface (see `base`):

    select(batch: MiningBatch, num: int, params: CandidateWindow) -> [Chosen]

`POOLS` in each module names the candidate pools the strategy reads
("dense": faiss top-K, "bm25", "same_doc"), so the mining stage builds only
those.
"""
from __future__ import annotations

from types import ModuleType

from . import bm25, dense, hybrid, same_doc, simans, uniform
from .base import Chosen, MiningBatch, Ranked, CandidateWindow, query_rng, query_seed
from .teacher_filter import teacher_exclusions

STRATEGIES: dict[str, ModuleType] = {"dense": dense, "simans": simans, "bm25": bm25, "random": uniform,
                                     "same_doc": same_doc, "hybrid": hybrid}

__all__ = ["STRATEGIES", "Chosen", "MiningBatch", "Ranked", "CandidateWindow", "query_rng", "query_seed",
           "teacher_exclusions"]
