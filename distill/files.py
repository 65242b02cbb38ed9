"""Small file helpers shared by the stages and the embedding cache."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path


def write_lines_atomic(path: Path, lines: Iterable[str]) -> int:
    """Write text lines so that a reader (or a rerun after kill -9) sees the old file or the new one, never half
    of one: a temp file, fsync, rename, fsync of the folder. Returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for line in lines:
                f.write(line)
                count += 1
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_folder(path.parent)  # make the rename itself durable
    return count


def write_text_atomic(path: Path, text: str) -> None:
    """One text file, written as `write_lines_atomic` writes (for done markers other tools read as is)."""
    write_lines_atomic(path, [text])


def fsync_folder(folder: Path) -> None:
    """Make renames and new entries in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, payload: dict) -> None:
    """One JSON document, written as `write_lines_atomic` writes."""
    write_lines_atomic(path, [json.dumps(payload, ensure_ascii=False, sort_keys=True)])


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 32 hex digits), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]
