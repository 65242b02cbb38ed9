"""Progress files of resumable record jobs (`<output>.progress.json`), and the check that they still
describe their output.

`stages.writer` writes them; whoever reads a job's output (a rerun of the job,
training reading a labels file) reads them here. A progress file is trusted only
once it is shown to describe the output (`verified_progress`): every unit is one
line, so the recorded bytes must hold exactly `units_done` whole lines, and the
last chunk's bytes must have the recorded sha256; a finished file must end where
its progress says. A hand-edited, truncated or damaged pair is refused with one
error naming the file and `--overwrite`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import DataError

PROGRESS_SUFFIX = ".progress.json"
FORMAT_VERSION = 2  # 2: the progress file records the last chunk's offset and sha256
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def progress_path(output: Path) -> Path:
    return output.with_name(output.name + PROGRESS_SUFFIX)


PROGRESS_FIELDS = {"version": int, "settings": dict, "units": int, "chunk_size": int, "units_done": int,
                   "bytes": int, "complete": bool}


class ProgressMismatch(DataError):
    """A progress file that is damaged, or that no longer describes its output; nothing is resumed from it."""

    def __init__(self, output: Path, reason: str):
        super().__init__(f"{progress_path(output)}: {reason}; the job's files were changed or damaged outside "
                         f"this job, so it cannot resume: rerun with --overwrite to start {output.name} again")


def read_progress(output: Path) -> dict | None:
    """The progress file beside `output`, checked for form (not yet against the output: `verified_progress`)."""
    path = progress_path(output)
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ProgressMismatch(output, "is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ProgressMismatch(output, f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    if not isinstance(progress, dict):
        raise ProgressMismatch(output, f"holds a JSON {type(progress).__name__}, not an object")
    for key, kind in PROGRESS_FIELDS.items():
        value = progress.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProgressMismatch(output, f'field "{key}" is ' + ("missing" if key not in progress else
                                                                   f"not {kind.__name__}: {value!r}"))
    units, done, size = progress["units"], progress["units_done"], progress["bytes"]
    if not 0 <= done <= units or size < 0 or progress["complete"] != (done == units):
        raise ProgressMismatch(output, f"its counts do not agree (units_done {done} of {units}, bytes {size}, "
                                       f"complete {progress['complete']})")
    return progress


def _count_lines(f, stop: int) -> tuple[int, bool]:
    """(newlines in the first `stop` bytes of `f`, whether those bytes end with a newline or are empty)."""
    f.seek(0)
    lines, left, last = 0, stop, b"\n"
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        lines += block.count(b"\n")
        left -= len(block)
        last = block[-1:]
    return lines, last == b"\n"


def _chunk_digest(f, start: int, stop: int) -> str:
    f.seek(start)
    return hashlib.sha256(f.read(stop - start)).hexdigest()


def verified_progress(output: Path) -> dict | None:
    """The progress file, once it is shown to describe `output`: the output holds at least `bytes` bytes
    (exactly that many when complete), those bytes hold `units_done` whole lines (one record per unit),
    and the last chunk's bytes have the recorded sha256. Any mismatch is a `ProgressMismatch`."""
    progress = read_progress(output)
    if progress is None:
        return None
    kept = progress["bytes"]
    size = output.stat().st_size if output.is_file() else None
    if size is None:
        if kept or progress["units_done"]:
            raise ProgressMismatch(output, f"{output.name} is missing")
        return progress
    if size < kept:
        raise ProgressMismatch(output, f"{output.name} is shorter ({size} bytes) than recorded ({kept})")
    if progress["complete"] and size != kept:
        raise ProgressMismatch(output, f"{output.name} has {size - kept} bytes after the end of the finished job")
    with open(output, "rb") as f:
        lines, whole = _count_lines(f, kept)
        if lines != progress["units_done"] or not whole:
            raise ProgressMismatch(output, f"the first {kept} bytes of {output.name} hold {lines} records"
                                           + ("" if whole else " and a cut one") + f", not the "
                                           f"{progress['units_done']} recorded")
        last = progress.get("last_chunk")
        if last is not None:  # written since format version 2
            if (not isinstance(last, dict) or not isinstance(last.get("start"), int)
                    or not 0 <= last["start"] <= kept or not isinstance(last.get("sha256"), str)):
                raise ProgressMismatch(output, f'field "last_chunk" is malformed: {last!r}')
            if _chunk_digest(f, last["start"], kept) != last["sha256"]:
                raise ProgressMismatch(output, f"the last chunk of {output.name} (bytes {last['start']}-{kept}) "
                                               "is not the one written")
        elif progress["version"] >= 2:
            raise ProgressMismatch(output, 'field "last_chunk" is missing')
    return progress


def is_complete(output: Path, settings: dict | None = None) -> bool:
    """True when `output` was finished by a job (with these settings, if given) and is still as written."""
    progress = verified_progress(output)
    return bool(progress and progress["complete"] and output.is_file()
                and (settings is None or progress["settings"] == canonical(settings)))


def canonical(settings: dict) -> dict:
    """Settings as the progress file stores them (JSON types, sorted keys), so they compare equal after a reload."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))
