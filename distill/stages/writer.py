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
settings is refused rather than mixing two jobs' records in one file. It is
trusted only once `data.progress.verified_progress` shows it still describes
the output (line count, size and the last chunk's sha256). It also records
`content_sha256`, the digest of all the bytes written so far (kept as a
running hash, so it costs no extra read while writing): a resume re-reads the
kept bytes and refuses them when an earlier chunk was changed, even to bytes
of the same length, and the Ray executor checks each part by it before
joining the parts.

Sharding (`--shard i/n`) gives shard i the i-th of n contiguous slices of the
units, so concatenating the n outputs in order yields every record once, in
the unsharded order.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from labelers.errors import UsageError

from ..data.progress import (EMPTY_SHA256, FORMAT_VERSION, ProgressMismatch, canonical, is_complete,
                             progress_path, read_progress, verified_progress)
from ..files import write_json_atomic

__all__ = ["JobSummary", "ProgressMismatch", "Shard", "check_content", "encode_records", "is_complete",
           "progress_path", "read_progress", "verified_progress", "write_resumable"]


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
            raise UsageError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"--shard {text}: need 0 <= i < n")
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


def encode_records(records: Sequence[dict | str]) -> bytes:
    """One JSON object per line, UTF-8, keys in the order the stage built them; a str is a line already
    encoded (copied from a part file), written as it is."""
    return "".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n"
                   for r in records).encode("utf-8")


def check_content(output: Path, progress: dict) -> hashlib._Hash:
    """The running sha256 of the first `progress["bytes"]` bytes of `output`, once it equals the recorded
    `content_sha256` (a progress file written before that field existed is trusted as before). The last
    chunk's digest, which `verified_progress` checks, cannot see an earlier chunk changed to bytes of the same
    length; this can, at the cost of reading the kept bytes once."""
    digest, left = hashlib.sha256(), progress["bytes"]
    if left:
        with open(output, "rb") as f:
            while left > 0 and (block := f.read(min(left, 1 << 20))):
                digest.update(block)
                left -= len(block)
    recorded = progress.get("content_sha256")
    if recorded is not None and digest.hexdigest() != recorded:
        raise ProgressMismatch(output, f"the first {progress['bytes']} bytes of {output.name} are not the ones "
                                       "written (a record was changed after it was written)")
    return digest


def _resume_point(output: Path, settings: dict, n_units: int, overwrite: bool) -> tuple[int, int, dict | None]:
    """(units done, bytes kept, progress) for this job; the caller cuts a partial trailing chunk off."""
    if overwrite:
        return 0, 0, None
    progress = verified_progress(output)
    if progress is None and not output.exists():
        return 0, 0, None
    if progress is None:
        raise UsageError(f"{output} exists but has no {progress_path(output).name}: it was not written by this "
                         "job; remove it or pass --overwrite")
    if progress["settings"] != canonical(settings) or progress["units"] != n_units:
        old = progress["settings"]
        changed = sorted(k for k in set(old) | set(canonical(settings)) if old.get(k) != canonical(settings).get(k))
        raise UsageError(f"{output} was started with other settings ({', '.join(changed) or 'unit count'} differ); "
                         "rerun with the same settings to resume, or pass --overwrite to start again")
    return progress["units_done"], progress["bytes"], progress


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
        raise UsageError("chunk_size must be at least 1")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done, kept, progress = _resume_point(output, settings, n_units, overwrite)
    content = check_content(output, progress) if progress else hashlib.sha256()
    started, written = time.perf_counter(), 0
    state = {"version": FORMAT_VERSION, "settings": canonical(settings), "units": n_units, "chunk_size": chunk_size}
    if done == 0:  # before the output exists: a kill in between leaves a job that resumes, not an orphan file
        write_json_atomic(progress_path(output), {**state, "units_done": 0, "bytes": 0, "complete": n_units == 0,
                                                  "last_chunk": {"start": 0, "sha256": EMPTY_SHA256},
                                                  "content_sha256": EMPTY_SHA256})
    bar = tqdm(total=n_units, initial=done, desc=desc, unit=unit, dynamic_ncols=True, disable=not show_progress)
    with bar, open(output, "r+b" if output.exists() and not overwrite else "wb") as f:
        f.truncate(kept)
        f.seek(kept)
        f.flush()
        os.fsync(f.fileno())
        for start in range(done, n_units, chunk_size):
            stop = min(start + chunk_size, n_units)
            records = process(start, stop)
            if len(records) != stop - start:  # one line per unit is what lets a rerun check the file
                raise RuntimeError(f"process({start}, {stop}) gave {len(records)} records for {stop - start} units")
            data = encode_records(records)
            chunk_start = f.tell()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            kept = f.tell()
            content.update(data)
            last_chunk = {"start": chunk_start, "sha256": hashlib.sha256(data).hexdigest()}
            write_json_atomic(progress_path(output), {**state, "units_done": stop, "bytes": kept,
                                                      "complete": stop == n_units, "last_chunk": last_chunk,
                                                      "content_sha256": content.hexdigest()})
            written += len(records)
            bar.update(stop - start)
            if postfix is not None and show_progress:
                bar.set_postfix_str(postfix(time.perf_counter() - started))
    return JobSummary(output, n_units, done, written, time.perf_counter() - started, True)
