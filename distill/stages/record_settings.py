"""The settings every record stage (generate, mine, label) has, declared once, and checked before any work.

`RecordStageSettings` holds what the three share: the seed, `--shard`, `--overwrite`, `--skip-invalid`,
`--progress` and where they run (`ExecutorSettings`). Each stage declares its own `chunk_size` (a unit is a
query for mine and label, a passage for generate, and the right chunk differs: 1024 queries a faiss search,
16 queries or 32 passages a teacher call). Its `__post_init__` checks them, so `distill run --dry-run`
refuses a bad value before the first stage runs, as `TrainConfig` does for training.

A stage checks its data-dependent settings against `supervision.SuppliedData` (`check_against`): what the
loaded data gives when the stage runs alone, and what the run's supervision promises when `distill run`
plans, before any stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from labelers.errors import UsageError

from ..supervision import SuppliedData
from .executor import ExecutorSettings
from .writer import Shard


@dataclass(kw_only=True)
class RecordStageSettings(ExecutorSettings):
    seed: int = field(default=0, metadata={"help": "seed of every random choice (drawn per query or passage)"})
    shard: str | None = field(default=None, metadata={
        "help": "i/n: run only the i-th of n contiguous slices of the units (queries or passages)"})
    overwrite: bool = field(default=False, metadata={
        "volatile": True, "help": "discard an existing output instead of resuming it"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip and count invalid records instead of stopping"})
    show_progress: bool = field(default=True, metadata={"volatile": True, "help": "progress bar"})

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        Shard.parse(self.shard)
        if getattr(self, "chunk_size", 1) < 1:
            raise UsageError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.workers < 1 or self.cpus_per_worker < 1 or self.gpus_per_worker < 0:  # also when they are unused
            raise UsageError(f"--workers and --cpus-per-worker must be >= 1 and --gpus-per-worker >= 0, got "
                             f"{self.workers}, {self.cpus_per_worker} and {self.gpus_per_worker}")
        self.check_executor(self.shard)

    def check_against(self, data: SuppliedData) -> None:
        """Refuse settings that `data` makes impossible or a no-op (each stage adds its own)."""
