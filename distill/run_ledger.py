"""What a `distill run` has done: each stage's fingerprint and status, and the content hashes of its data.

`OUTPUT_DIR/stages/<name>.json` (`StageLedger`) holds a stage's fingerprint, "started" before it runs and
"complete" after. The fingerprint (`stage_record`) covers the stage's settings (`config.output_settings`:
volatile ones left out), the content of the data sets it reads (`DataHashes`: a hash of the files' bytes,
remembered per (path, size, mtime), so a copied or touched folder is still the same data) and the
fingerprints of the stages whose output it reads; `why_changed` says in one line what differs.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import output_settings
from .data import data_files, resolve_data_dir
from .files import write_json_atomic


class DataHashes:
    """Content hashes of data sets, remembered per file (path, size, mtime) in `cache` so that an
    unchanged file is hashed once; a copied or touched file with the same bytes hashes the same."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.known: dict[str, list] = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}

    def file(self, path: Path) -> str:
        stat = path.stat()
        key, seen = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        if key in self.known and self.known[key][:2] == seen:
            return self.known[key][2]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.known[key] = [*seen, digest.hexdigest()]
        write_json_atomic(self.cache, self.known)
        return digest.hexdigest()

    def __call__(self, data: str) -> str:
        folder = resolve_data_dir(data)
        entries = [(str(p.relative_to(folder)), self.file(p)) for p in data_files(folder)]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]


def stage_record(stage, cfg: Any, data_hash: Callable[[str], str], fingerprints: dict[str, str]) -> dict:
    """What a stage's output depends on: its settings, the data it reads, the stages it reads from,
    and the fingerprint of all three."""
    settings = output_settings(cfg)
    inputs = {str(data): data_hash(str(data)) for data in stage.reads}
    upstream = {name: fingerprints[name] for name in stage.after}
    fp = hashlib.sha256(json.dumps({"stage": stage.name, "settings": settings, "inputs": inputs,
                                    "upstream": upstream}, sort_keys=True).encode()).hexdigest()[:24]
    return {"fingerprint": fp, "settings": settings, "inputs": inputs, "upstream": upstream}


def why_changed(old: dict, new: dict) -> str:
    """One line saying what differs between a stage's recorded dependencies and its current ones."""
    if "settings" not in old:
        return "recorded by an older version"
    reasons = []
    for kind, label in (("settings", "settings changed"), ("inputs", "data changed"),
                        ("upstream", "earlier stage redone")):
        keys = sorted(k for k in set(old[kind]) | set(new[kind]) if old[kind].get(k) != new[kind].get(k))
        if not keys:
            continue
        if kind == "settings":  # a setting a record lacks came with a newer version (None is a real value)
            shown = [[repr(side[k]) if k in side else "(not recorded)" for side in (old[kind], new[kind])]
                     for k in keys[:3]]
            keys = [f"{k} {was} -> {now}" for k, (was, now) in zip(keys, shown)] + (
                [f"+{len(keys) - 3} more"] if len(keys) > 3 else [])
        reasons.append(f"{label}: {', '.join(keys)}")
    return "; ".join(reasons) or "fingerprint changed"


class StageLedger:
    """OUTPUT_DIR/stages/<name>.json: a stage's fingerprint and whether it started or completed."""

    def __init__(self, folder: Path):
        self.folder = folder / "stages"
        self.folder.mkdir(parents=True, exist_ok=True)

    def read(self, name: str) -> dict | None:
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write(self, name: str, record: dict) -> None:
        write_json_atomic(self.folder / f"{name}.json", record)
