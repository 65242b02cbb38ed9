"""Small file helpers shared by the stages and the embedding cache."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that a reader (or a rerun after kill -9) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=False, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 32 hex digits), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]
