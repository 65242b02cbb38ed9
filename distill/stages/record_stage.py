"""One skeleton for the stages that write records: label, mine and generate.

A stage is a `RecordStage`: a fixed list of units (queries, passages) for one
shard of the job, the settings its output depends on, a deterministic
`process(start, stop)` that turns units [start, stop) into one record each,
and `start()` / `close()` around the heavy part (a teacher model, an encoder's
embeddings). `run_record_stage` is everything around it, written once:

    already complete with these settings?  -> say so, do nothing
    start()                                -> load models before the output is touched
    write_resumable(process)               -> chunks, fsync, progress file, resume, progress bar, under
                                              `<output>.lock` (one writer per output, freed if it dies)
    close()                                -> always, also after an error or Ctrl-C

so a stage supplies only its work, its settings and its summary line. The same
object is what a distributed executor would run shard after shard.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from labelers.errors import UsageError

from .executor import ExecutorSettings, run_on_ray
from .output_lock import OutputLock
from .writer import JobSummary, is_complete, write_resumable


class RecordStage(Protocol):
    desc: str           # the progress bar's label, e.g. "label"
    unit: str           # what a unit is, e.g. "query"

    @property
    def n_units(self) -> int:
        """Units of this shard's job."""
        ...

    def settings(self) -> dict:
        """What the output depends on; a rerun with other settings is refused, one with the same resumes."""
        ...

    def start(self) -> None:
        """Load what `process` needs (models, embeddings); called only when there is work to do."""
        ...

    def process(self, start: int, stop: int) -> list[dict]:
        """One record per unit of [start, stop), the same every time for the same slice."""
        ...

    def postfix(self, seconds: float) -> str:
        """Rates for the progress bar after `seconds` of this run."""
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True)
class StageRun:
    job: JobSummary
    already_complete: bool   # the output was finished before this run: nothing was done


def run_record_stage(stage: RecordStage, output: Path, *, chunk_size: int, overwrite: bool,
                     show_progress: bool, executor: ExecutorSettings | None = None,
                     factory: Callable[[], RecordStage] | None = None) -> StageRun:
    """Write `stage`'s records to `output`, resuming a partial file; see the module docstring. With
    `executor.executor == "ray"`, Ray actors each build the stage with `factory` and write parts of it
    (`executor.run_on_ray`); `stage.prepare()`, when the stage has one, runs first, once, here."""
    output = Path(output)
    settings = stage.settings()
    if not overwrite and is_complete(output, settings):
        plural = "queries" if stage.unit == "query" else stage.unit + "s"
        print(f"{output}: already complete ({stage.n_units} {plural}); nothing to do")
        return StageRun(JobSummary(output, stage.n_units, stage.n_units, 0, 0.0, True), True)
    if executor is not None and executor.executor == "ray":
        if factory is None:
            raise UsageError(f"{stage.desc} cannot run on Ray")
        getattr(stage, "prepare", lambda: None)()
        return StageRun(run_on_ray(stage, factory, output, settings, chunk_size=chunk_size, overwrite=overwrite,
                                   show_progress=show_progress, executor=executor), False)
    try:
        with OutputLock(output):  # a second local job on the same output is refused, as a second Ray driver is
            stage.start()
            job = write_resumable(output, stage.n_units, stage.process, settings=settings, chunk_size=chunk_size,
                                  overwrite=overwrite, show_progress=show_progress, desc=stage.desc, unit=stage.unit,
                                  postfix=stage.postfix)
    finally:
        stage.close()
    return StageRun(job, False)
