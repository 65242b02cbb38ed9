"""Where a record stage's work runs: this process (`local`), or Ray actors on a cluster (`ray`).

With `--executor ray` the job's units are cut into parts of whole chunks (so every chunk is the very slice a
local run processes, and its records the very bytes). Each Ray actor builds the stage once (one teacher or one
encoder, on `--gpus-per-worker` GPUs or one CPU) and takes part after part from Ray's `ActorPool`, writing
each through the resumable writer to `<output>.parts/` on shared storage. Actors run with `max_restarts=-1`
and their tasks with `max_task_retries=-1`: a worker that dies is restarted by Ray and its part resumes from
the last fsync'd chunk. When every part is complete the driver copies them, in order, into `<output>` with the
same writer and chunk size, so the file and its progress file are those of a local run (with as many torch
threads per process as `--cpus-per-worker`: float sums follow the thread count); a driver killed at any point
is rerun with the same command and redoes no complete part. One progress bar covers the whole job.

Ray is an optional extra (`pip install '.[ray]'`), imported only here, only when `--executor ray` is asked for.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from labelers.errors import UsageError

from ..data.progress import read_progress
from .writer import JobSummary, is_complete, write_resumable

INSTALL_HINT = "--executor ray needs Ray: pip install 'llm-distill-retrieval[ray]' (or pip install 'ray>=2.40')"
PARTS_PER_WORKER = 4  # parts per worker: enough to balance uneven parts, few enough to keep the parts folder small


@dataclass(kw_only=True)
class ExecutorSettings:
    executor: str = field(default="local", metadata={
        "help": "run in this process, or on Ray actors (one model each) across a cluster", "choices": ["local", "ray"],
        "volatile": True})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join (default: a running one, else a local one on this machine)", "volatile": True})
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


def parts_of(n_units: int, chunk_size: int, workers: int) -> list[Part]:
    """Contiguous parts of whole chunks covering [0, n_units)."""
    chunks = -(-n_units // chunk_size)
    per_part = max(1, -(-chunks // (workers * PARTS_PER_WORKER)))
    bounds = list(range(0, n_units, per_part * chunk_size)) + [n_units]
    return [Part(i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_settings(settings: dict, part: Part) -> dict:
    return {**settings, "part": [part.start, part.stop]}


class StageWorker:
    """What one Ray actor runs: the stage, built once in the actor's process, writing the parts it is given."""

    def __init__(self, factory: Callable[[], object], threads: int):
        import torch

        torch.set_num_threads(threads)  # float results follow the thread count: as many as the actor's cores
        self.stage = factory()
        self.stage.start()

    def run_part(self, part: Part, folder: str, settings: dict, chunk_size: int) -> int:
        output = part.path(Path(folder))
        write_resumable(output, part.stop - part.start,
                        lambda start, stop: self.stage.process(part.start + start, part.start + stop),
                        settings=part_settings(settings, part), chunk_size=chunk_size)
        return part.index


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return ray


def _connect(address: str | None) -> None:
    ray = _import_ray()
    if ray.is_initialized():
        return
    options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if address:
        ray.init(address=address, **options)
        return
    try:
        ray.init(address="auto", **options)  # a cluster started with `ray start --head`
    except ConnectionError:
        ray.init(**options)  # none running: a local one on this machine


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
    ray = _import_ray()  # a missing extra is the install hint, before any work
    from ray.util.actor_pool import ActorPool

    started = time.perf_counter()
    folder = parts_folder(output)
    if overwrite:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    n_units = stage.n_units
    parts = parts_of(n_units, chunk_size, executor.workers)
    todo = [p for p in parts if not is_complete(p.path(folder), part_settings(settings, p))]
    if len(todo) < len(parts):
        print(f"ray: {len(parts) - len(todo)} of {len(parts)} parts already complete, {len(todo)} to do", flush=True)
    if todo:
        _connect(executor.ray_address)
        resources = {"num_cpus": executor.cpus_per_worker}
        if executor.gpus_per_worker:
            resources["num_gpus"] = executor.gpus_per_worker
        worker = ray.remote(max_restarts=-1, max_task_retries=-1, **resources)(StageWorker)
        actors = [worker.remote(factory, executor.cpus_per_worker) for _ in range(min(executor.workers, len(todo)))]
        pool = ActorPool(actors)
        for part in todo:
            pool.submit(lambda actor, p: actor.run_part.remote(p, str(folder), settings, chunk_size), part)
        bar = tqdm(total=n_units, initial=_units_done(folder, parts), desc=f"{stage.desc} (ray, {len(actors)} "
                   "workers)", unit=stage.unit, dynamic_ncols=True, disable=not show_progress)
        with bar:
            while pool.has_next():
                try:
                    pool.get_next_unordered(timeout=1.0)
                except TimeoutError:
                    pass
                bar.update(_units_done(folder, parts) - bar.n)
        for actor in actors:
            ray.kill(actor)
    with PartLines(parts, folder) as lines:
        summary = write_resumable(output, n_units, lines.take, settings=settings, chunk_size=chunk_size,
                                  overwrite=overwrite)
    shutil.rmtree(folder, ignore_errors=True)
    return JobSummary(output, n_units, summary.resumed_from, summary.records, time.perf_counter() - started, True)


class PartLines:
    """The complete parts' lines, read once from start to end: `take(start, stop)` gives units [start, stop)."""

    def __init__(self, parts: list[Part], folder: Path):
        self.parts, self.folder = parts, folder
        self.file, self.part, self.next = None, -1, 0

    def __enter__(self) -> PartLines:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()

    def take(self, start: int, stop: int) -> list[str]:
        lines = []
        for unit in range(start, stop):
            part = next(i for i, p in enumerate(self.parts) if p.start <= unit < p.stop)
            if part != self.part or unit != self.next:  # a new part, or a resumed copy starting mid-part
                if self.file is not None:
                    self.file.close()
                self.file = open(self.parts[part].path(self.folder), encoding="utf-8")
                for _ in range(unit - self.parts[part].start):
                    self.file.readline()
                self.part = part
            lines.append(self.file.readline())
            self.next = unit + 1
        return lines
