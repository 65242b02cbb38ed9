"""Student losses, one module each, one interface: `loss(LossInputs) -> scalar`.

Each module also has the pure function its docstring writes down
(`info_nce`, `soft_label_weighted`, `rank_filtered`, `kl_distillation`,
`margin_mse`, `cosent`, `simcse`) and `NEEDS_REWARDS`. A training objective
is a weighted sum of them, written `"rank_filter:1.0,infonce:0.2"`
(LLM-Embedder: 1.0·distillation + 0.2·contrastive).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from labelers.errors import UsageError

from . import cosent, infonce, kl, margin_mse, rank_filter, simcse, soft_label
from .base import LossInputs

LOSSES: dict[str, ModuleType] = {"infonce": infonce, "soft_label": soft_label, "rank_filter": rank_filter,
                                 "kl": kl, "margin_mse": margin_mse, "cosent": cosent, "simcse": simcse}


@dataclass(frozen=True)
class Objective:
    """A weighted sum of registered losses."""

    terms: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, spec: str) -> Objective:
        """"rank_filter:1.0,infonce:0.2" -> terms; a bare name weighs 1."""
        terms = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, _, weight = part.partition(":")
            name = name.strip()
            if name not in LOSSES:
                raise UsageError(f"unknown loss {name!r} in {spec!r}; choose from {sorted(LOSSES)}")
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                raise UsageError(f"loss weight {weight!r} in {spec!r} is not a number") from None
            terms.append((name, value))
        if not terms:
            raise UsageError(f"no loss in {spec!r}")
        return cls(tuple(terms))

    @property
    def passages_only(self) -> bool:
        """True for an objective that trains on the corpus alone (SimCSE); it cannot mix with query losses."""
        alone = [getattr(LOSSES[name], "PASSAGES_ONLY", False) for name, _ in self.terms]
        if any(alone) and not all(alone):
            mixed = ", ".join(name for (name, _), a in zip(self.terms, alone) if a)
            raise UsageError(f"--loss {self}: {mixed} trains on passages alone (each encoded twice, no queries) and "
                             "does not combine with query losses in one run; train it first (--loss simcse) and "
                             "give its output as --model to the query run")
        return all(alone)

    @property
    def needs_rewards(self) -> bool:
        return any(LOSSES[name].NEEDS_REWARDS for name, _ in self.terms)

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
        """(Σ weight·loss, each term's unweighted value for the log)."""
        total = None
        parts = {}
        for name, weight in self.terms:
            value = LOSSES[name].loss(inputs)
            parts[name] = float(value.detach())
            total = weight * value if total is None else total + weight * value
        return total, parts

    def __str__(self) -> str:
        return ",".join(f"{name}:{weight:g}" for name, weight in self.terms)


__all__ = ["LOSSES", "LossInputs", "Objective"]
