"""The resumable, sharded JSON Lines writer every record-producing stage uses.

A stage's work is a fixed, ordered list of units (queries, passages). They are
processed in chunks of `chunk_size` units; each chunk's records are appended to
the output in one write and fsync'd, and only then does the progress file
beside it (`<output>.progress.json`, replaced atomically) advance to the new
byte length and unit count. On restart the output is cut back to the last
recorded length and work resumes at the next chunk boundary, so a run killed
at any moment and rerun produces the very bytes an uninterrupted run does
(chunks are the same, so batches and float results are the same).

The progress file also holds the job's settings; rerunning with different
settings is refused rather than mixing two jobs' records in one file.

Sharding (`--shard i/n`) gives shard i the i-th of n contiguous slices of the
units, so concatenating the n outputs in order yields every record once, in
the unsharded order.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..files import write_json_atomic

PROGRESS_SUFFIX = ".progress.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """`"i/n"` with 0 <= i < n; None means the whole job."""
        if text is None or text == "":
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard {text}: need 0 <= i < n")
        return cls(index, count)

    def bounds(self, n_units: int) -> tuple[int, int]:
        """[start, stop) of this shard's contiguous slice of n_units."""
        return self.index * n_units // self.count, (self.index + 1) * n_units // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class JobSummary:
    output: Path
    units: int
    resumed_from: int      # units already done when this run started
    records: int           # records written by this run
    seconds: float
    complete: bool


def progress_path(output: Path) -> Path:
    return output.with_name(output.name + PROGRESS_SUFFIX)


def encode_records(records: Sequence[dict]) -> bytes:
    """One JSON object per line, UTF-8, keys in the order the stage built them."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def read_progress(output: Path) -> dict | None:
    path = progress_path(output)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_complete(output: Path, settings: dict | None = None) -> bool:
    """True when `output` was finished by a job (with these settings, if given)."""
    progress = read_progress(output)
    return bool(progress and progress.get("complete") and output.is_file()
                and (settings is None or progress.get("settings") == _canonical(settings)))


def _canonical(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _resume_point(output: Path, settings: dict, n_units: int, overwrite: bool) -> tuple[int, int]:
    """(units done, bytes kept) for this job; cuts a partial trailing chunk off the output."""
    progress = read_progress(output)
    if overwrite or (progress is None and not output.exists()):
        return 0, 0
    if progress is None:
        raise ValueError(f"{output} exists but has no {progress_path(output).name}: it was not written by this "
                         "job; remove it or pass --overwrite")
    if progress.get("settings") != _canonical(settings) or progress.get("units") != n_units:
        old = progress.get("settings", {})
        changed = sorted(k for k in set(old) | set(_canonical(settings)) if old.get(k) != _canonical(settings).get(k))
        raise ValueError(f"{output} was started with other settings ({', '.join(changed) or 'unit count'} differ); "
                         "rerun with the same settings to resume, or pass --overwrite to start again")
    kept = int(progress["bytes"])
    size = output.stat().st_size if output.exists() else 0
    if size < kept:
        raise ValueError(f"{output} is shorter ({size} bytes) than its progress file records ({kept}); "
                         "it was changed outside this job; pass --overwrite to start again")
    return int(progress["units_done"]), kept


def write_resumable(output: Path, n_units: int, process: Callable[[int, int], list[dict]], *, settings: dict[str, Any],
                    chunk_size: int = 64, overwrite: bool = False, show_progress: bool = False,
                    desc: str = "", unit: str = "unit", postfix: Callable[[float], str] | None = None) -> JobSummary:
    """Run `process(start, stop) -> records` over units [0, n_units) in chunks, appending to `output`.

    `process` must be deterministic in (start, stop): the same chunk always
    yields the same records. With `show_progress`, a progress bar counts units
    (from where a resumed job starts) and shows `postfix(seconds this run has
    taken)` after each chunk.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done, kept = _resume_point(output, settings, n_units, overwrite)
    started, written = time.perf_counter(), 0
    state = {"version": FORMAT_VERSION, "settings": _canonical(settings), "units": n_units, "chunk_size": chunk_size}
    bar = tqdm(total=n_units, initial=done, desc=desc, unit=unit, dynamic_ncols=True, disable=not show_progress)
    with bar, open(output, "r+b" if output.exists() and not overwrite else "wb") as f:
        f.truncate(kept)
        f.seek(kept)
        f.flush()
        os.fsync(f.fileno())
        if done == 0:
            write_json_atomic(progress_path(output), {**state, "units_done": 0, "bytes": 0, "complete": n_units == 0})
        for start in range(done, n_units, chunk_size):
            stop = min(start + chunk_size, n_units)
            records = process(start, stop)
            f.write(encode_records(records))
            f.flush()
            os.fsync(f.fileno())
            kept = f.tell()
            write_json_atomic(progress_path(output),
                               {**state, "units_done": stop, "bytes": kept, "complete": stop == n_units})
            written += len(records)
            bar.update(stop - start)
            if postfix is not None and show_progress:
                bar.set_postfix_str(postfix(time.perf_counter() - started))
    return JobSummary(output, n_units, done, written, time.perf_counter() - started, True)
