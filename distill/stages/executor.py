"""Where a record stage's work runs: this process (`local`), or Ray actors on a cluster (`ray`).

With `--executor ray` the job's units are cut into parts of whole chunks (so every chunk is the very slice a
local run processes, and its records the very bytes). The cut depends on the job alone (its units and chunk
size), never on the cluster, so a job stopped with `--workers 8` resumes the same parts with `--workers 1`. Each
Ray actor builds the stage once (one teacher or one encoder, on `--gpus-per-worker` GPUs or one CPU) and takes
part after part from Ray's `ActorPool`, writing each through the resumable writer to `<output>.parts/` on shared
storage. Actors run with `max_restarts=-1` and their tasks with `max_task_retries=-1`: a worker that dies is
restarted by Ray and its part resumes from the last fsync'd chunk. When every part is complete, and its bytes
are shown to be the ones its progress file recorded (the whole part's sha256), the driver copies the parts, in
order, into `<output>` with the same writer and chunk size, so the file and its progress file are those of a
local run (with as many torch threads per process as `--cpus-per-worker`: float sums follow the thread count); a
driver killed at any point is rerun with the same command and redoes no complete part, and a part changed after
it was written is done again. One progress bar covers the whole job.

The driver holds `<output>.lock` (`output_lock`) for the whole job, so a second driver on the same output is
refused up front. An exception raised in an actor reaches the user as itself: Ray's `RayTaskError` is unwrapped,
so a `UsageError` (a `DataError` only a worker meets) prints its one line, and a bug keeps the remote traceback.
Which cluster the driver joins, or starts for itself alone, is `ray_cluster`'s job.

Ray is an optional extra (`pip install '.[ray]'`), imported only here and in `ray_cluster`, only when `--executor
ray` is asked for.
"""
from __future__ import annotations

import bisect
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from labelers.errors import UsageError

from ..data.errors import DataError
from ..data.progress import canonical, progress_path, read_progress
from .output_lock import OutputLock
from .ray_cluster import connect, import_ray
from .writer import JobSummary, ProgressMismatch, check_content, verified_progress, write_resumable

MAX_PARTS = 256             # enough to keep 64 workers busy to the end (4 parts each); a folder this small is cheap
MIN_CHUNKS_PER_PART = 4     # a small job is not spread over an actor (and a model load) per chunk


@dataclass(kw_only=True)
class ExecutorSettings:
    executor: str = field(default="local", metadata={
        "help": "run in this process, or on Ray actors (one model each) across a cluster", "choices": ["local", "ray"],
        "volatile": True})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join (default: RAY_ADDRESS, else the one `ray start` started on this machine, else "
                "one started for this job alone)", "volatile": True})
    workers: int = field(default=2, metadata={"help": "Ray actors, each with its own model", "volatile": True})
    gpus_per_worker: float = field(default=0.0, metadata={
        "help": "GPUs per Ray actor; with the vllm backend and more than 1, vLLM's tensor-parallel size",
        "volatile": True})
    cpus_per_worker: int = field(default=1, metadata={
        "help": "CPU cores per Ray actor (its torch threads): records equal a local run's with as many threads",
        "volatile": True})

    def check_executor(self, shard: str | None) -> None:
        if self.executor == "ray":
            if shard:
                raise UsageError("--shard and --executor ray both split the job: give one of them")
            if self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker < 1:
                raise UsageError("--workers and --cpus-per-worker must be >= 1, --gpus-per-worker >= 0")


@dataclass(frozen=True)
class Part:
    index: int
    start: int
    stop: int

    def path(self, folder: Path) -> Path:
        return folder / f"part-{self.index:05d}.jsonl"


def parts_of(n_units: int, chunk_size: int) -> list[Part]:
    """Contiguous parts of whole chunks covering [0, n_units): at most MAX_PARTS of them, of at least
    MIN_CHUNKS_PER_PART chunks each; a function of the job alone, so any worker count resumes the same parts."""
    chunks = -(-n_units // chunk_size)
    per_part = max(MIN_CHUNKS_PER_PART, -(-chunks // MAX_PARTS))
    bounds = list(range(0, n_units, per_part * chunk_size)) + [n_units]
    return [Part(i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_settings(settings: dict, part: Part) -> dict:
    return {**settings, "part": [part.start, part.stop]}


class StageWorker:
    """What one Ray actor runs: the stage, built in the actor's process before its first part, writing the parts
    it is given. The stage is built in a task, not in `__init__`: an actor whose constructor raises is dead for
    good and Ray hands its callers an `ActorDiedError` holding only a message, while a task's exception reaches
    the driver whole (and is raised there as itself)."""

    def __init__(self, factory: Callable[[], object], threads: int):
        self.factory, self.threads, self.stage = factory, threads, None

    def run_part(self, part: Part, folder: str, settings: dict, chunk_size: int) -> int:
        if self.stage is None:
            import torch

            # float results follow the thread count: as many as the actor's cores
            torch.set_num_threads(self.threads)
            stage = self.factory()
            stage.start()
            self.stage = stage
        output = part.path(Path(folder))
        write_resumable(output, part.stop - part.start,
                        lambda start, stop: self.stage.process(part.start + start, part.start + stop),
                        settings=part_settings(settings, part), chunk_size=chunk_size)
        return part.index


class RemoteTraceback(Exception):
    """The traceback an actor's exception had where it was raised, as text: chained as the cause of that exception
    when the driver re-raises it (as `concurrent.futures` does for a worker process's exception)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


def sound_part(part: Part, folder: Path, settings: dict) -> bool:
    """True when the part is complete with this job's settings and its bytes are the ones written (the whole
    part's sha256 against its progress file). A part changed or damaged after it was written, cut with other
    bounds (by an older distill), or complete without that sha256 (written by one) is removed, and so done
    again; one begun with other settings of the job is refused, as a local job's output is."""
    path, wanted = part.path(folder), canonical(part_settings(settings, part))
    try:
        progress = verified_progress(path)
        if progress is not None:
            check_content(path, progress)
    except ProgressMismatch:
        return _redo(path, "changed or damaged after it was written")
    if progress is None:
        return False
    changed = sorted(k for k in set(wanted) | set(progress["settings"]) if wanted.get(k) != progress["settings"].get(k))
    if changed == ["part"]:
        return _redo(path, "cut with other bounds")
    if changed:
        raise UsageError(f"{path} was started with other settings ({', '.join(changed)} differ); rerun with the same "
                         "settings to resume, or pass --overwrite to start again")
    if progress["complete"] and "content_sha256" not in progress:
        return _redo(path, "written with no sha256 of its bytes")
    return progress["complete"]


def _redo(path: Path, why: str) -> bool:
    print(f"ray: {path.name} was {why}: doing it again", flush=True)
    path.unlink(missing_ok=True)
    progress_path(path).unlink(missing_ok=True)
    return False


def _units_done(folder: Path, parts: list[Part]) -> int:
    done = 0
    for part in parts:
        try:
            progress = read_progress(part.path(folder))
        except ValueError:
            progress = None
        done += progress["units_done"] if progress else 0
    return done


def run_on_ray(stage, factory: Callable[[], object], output: Path, settings: dict, *, chunk_size: int,
               overwrite: bool, show_progress: bool, executor: ExecutorSettings) -> JobSummary:
    """The job on Ray actors (see the module docstring); returns the assembled output's summary."""
    import_ray()  # a missing extra is the install hint, before any work
    started = time.perf_counter()
    with OutputLock(output):
        folder = parts_folder(output)
        if overwrite:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        parts = parts_of(stage.n_units, chunk_size)
        todo = [p for p in parts if not sound_part(p, folder, settings)]
        if len(todo) < len(parts):
            print(f"ray: {len(parts) - len(todo)} of {len(parts)} parts already complete, {len(todo)} to do",
                  flush=True)
        if todo:
            _run_parts(stage, factory, folder, parts, todo, settings, chunk_size, show_progress, executor)
        summary = write_resumable(output, stage.n_units, PartLines(parts, folder).take, settings=settings,
                                  chunk_size=chunk_size, overwrite=overwrite)
        shutil.rmtree(folder, ignore_errors=True)
    return JobSummary(output, stage.n_units, summary.resumed_from, summary.records, time.perf_counter() - started,
                      True)


def _run_parts(stage, factory: Callable[[], object], folder: Path, parts: list[Part], todo: list[Part],
               settings: dict, chunk_size: int, show_progress: bool, executor: ExecutorSettings) -> None:
    """Write the `todo` parts on Ray actors, with one progress bar over the whole job."""
    ray = import_ray()
    from ray.exceptions import RayTaskError
    from ray.util.actor_pool import ActorPool

    connect(executor.ray_address)
    resources = {"num_cpus": executor.cpus_per_worker}
    if executor.gpus_per_worker:
        resources["num_gpus"] = executor.gpus_per_worker
    worker = ray.remote(max_restarts=-1, max_task_retries=-1, **resources)(StageWorker)
    actors = [worker.remote(factory, executor.cpus_per_worker) for _ in range(min(executor.workers, len(todo)))]
    try:
        pool = ActorPool(actors)
        for part in todo:
            pool.submit(lambda actor, p: actor.run_part.remote(p, str(folder), settings, chunk_size), part)
        bar = tqdm(total=stage.n_units, initial=_units_done(folder, parts), desc=f"{stage.desc} (ray, "
                   f"{len(actors)} workers)", unit=stage.unit, dynamic_ncols=True, disable=not show_progress)
        with bar:
            while pool.has_next():
                try:
                    pool.get_next_unordered(timeout=1.0)
                except RayTaskError as exc:  # before TimeoutError: a remote TimeoutError is one too
                    # the actor's own exception (RayTaskError subclasses its class, and its first line is Ray's
                    # task header): a UsageError prints its one line, a bug keeps the remote traceback
                    raise exc.cause from RemoteTraceback(str(exc))
                except TimeoutError:
                    pass
                bar.update(_units_done(folder, parts) - bar.n)
    finally:
        for actor in actors:
            ray.kill(actor)


class PartLines:
    """The complete parts' lines, one part in memory at a time: `take(start, stop)` gives units [start, stop).
    Each part is checked as it is read: its sha256 must be the one its progress file recorded, so no byte that
    changed after it was written reaches the output."""

    def __init__(self, parts: list[Part], folder: Path):
        self.parts, self.folder = parts, folder
        self.starts = [p.start for p in parts]
        self.index, self.lines = -1, []

    def take(self, start: int, stop: int) -> list[str]:
        lines = []
        for unit in range(start, stop):
            index = bisect.bisect_right(self.starts, unit) - 1
            if index != self.index:
                self.lines, self.index = self._read(self.parts[index]), index
            lines.append(self.lines[unit - self.parts[index].start])
        return lines

    def _read(self, part: Part) -> list[str]:
        path = part.path(self.folder)
        data, progress = path.read_bytes(), read_progress(path)
        if progress is None or hashlib.sha256(data).hexdigest() != progress.get("content_sha256"):
            raise DataError(f"{path}: changed while this job ran (its sha256 is not the one its progress file "
                            "recorded); rerun the same command to do that part again")
        lines = [line + "\n" for line in data.decode("utf-8").split("\n")[:-1]]
        if len(lines) != part.stop - part.start:
            raise DataError(f"{path}: holds {len(lines)} records, not the {part.stop - part.start} of its part; "
                            "rerun the same command to do that part again")
        return lines
