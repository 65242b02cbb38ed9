"""The rank-window settings that `distill mine` and training's re-mining share, declared once.

A stage's config inherits `WindowSettings`, so `--range-min`, `--range-max`, `--simans-a` and `--simans-b`
mean the same and default the same in both (see `CandidateWindow` for what they do).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import CandidateWindow


@dataclass(kw_only=True)
class WindowSettings:
    range_min: int = field(default=0, metadata={
        "help": "skip the retriever's first N surviving candidates (likely unlabelled positives)"})
    range_max: int = field(default=100, metadata={"help": "consider surviving candidates up to this rank"})
    simans_a: float = field(default=0.5, metadata={"help": "SimANS sharpness a in exp(-a(s - s+ - b)^2)"})
    simans_b: float = field(default=0.0, metadata={"help": "SimANS shift b: the peak is at s = s+ + b"})

    def candidate_window(self, **more) -> CandidateWindow:
        """The window these settings give, with the stage's own filters (`more`) on top."""
        return CandidateWindow(range_min=self.range_min, range_max=self.range_max, simans_a=self.simans_a,
                               simans_b=self.simans_b, **more)
