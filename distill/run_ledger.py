"""What a `distill run` has done: each stage's fingerprint and status, and the content hashes of its data.

`OUTPUT_DIR/stages/<name>.json` (`StageLedger`) holds a stage's fingerprint, "started" before it runs and
"complete" after. The fingerprint (`stage_record`) covers the stage's settings (`config.output_settings`:
volatile ones left out), the content of the data sets it reads (`DataHashes`: a hash of the files' bytes,
remembered per (path, size, mtime), so a copied or touched folder is still the same data) and the
content of the models it loads (`DataHashes.model`: a student or teacher folder changed in place is a change)
and the fingerprints of the stages whose output it reads; `why_changed` says in one line what differs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import output_settings
from .data import data_files, resolve_data_dir
from .files import write_json_atomic


class DataHashes:
    """Content hashes of data sets, remembered per file (path, size, mtime) in `cache` so that an
    unchanged file is hashed once; a copied or touched file with the same bytes hashes the same.

    By design, an edit that keeps a file's size and whose modification time is then set back (`touch -d`,
    `cp --preserve`, some sync tools) is not noticed: the remembered hash is trusted. To force every file to be
    hashed again, delete `OUTPUT_DIR/data_hashes.json` (the run then rehashes, and reruns what changed)."""

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

    def model(self, name: str) -> str:
        """A model folder's content hash (every file under it, by relative name and bytes); a name that is not
        a local folder (a hub id) is taken as it is: its files live in the hub's cache, under its revision."""
        folder = Path(name).expanduser()
        if not folder.is_dir():
            return f"name:{name}"
        entries = [(str(p.relative_to(folder)), self.file(p)) for p in sorted(folder.rglob("*")) if p.is_file()]
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]


MODEL_SETTINGS = ("model", "llm", "retriever")  # the settings of a stage that name a model it loads


def stage_models(cfg: Any, data_hash: DataHashes, run_output: Path | None) -> dict[str, str]:
    """{setting: content hash} of the models a stage loads, less those the run itself writes (under
    `run_output`: their stage's fingerprint already covers them)."""
    out = {}
    for name in MODEL_SETTINGS:
        value = getattr(cfg, name, None)
        if not value:
            continue
        path = Path(str(value)).resolve()
        if run_output is not None and (path == run_output.resolve() or run_output.resolve() in path.parents):
            continue
        out[name] = data_hash.model(str(value))
    return out


def stage_record(stage, cfg: Any, data_hash: DataHashes, fingerprints: dict[str, str],
                 run_output: Path | None = None) -> dict:
    """What a stage's output depends on: its settings, the data it reads, the content of the models it loads
    (a student or teacher folder changed in place is a change), the stages it reads from, and the fingerprint
    of all four."""
    settings = output_settings(cfg)
    inputs = {str(data): data_hash(str(data)) for data in stage.reads}
    models = stage_models(cfg, data_hash, run_output)
    upstream = {name: fingerprints[name] for name in stage.after}
    fp = hashlib.sha256(json.dumps({"stage": stage.name, "settings": settings, "inputs": inputs, "models": models,
                                    "upstream": upstream}, sort_keys=True).encode()).hexdigest()[:24]
    return {"fingerprint": fp, "settings": settings, "inputs": inputs, "models": models, "upstream": upstream}


def why_changed(old: dict, new: dict) -> str:
    """One line saying what differs between a stage's recorded dependencies and its current ones."""
    if "settings" not in old:
        return "recorded by an older version"
    reasons = []
    for kind, label in (("settings", "settings changed"), ("inputs", "data changed"),
                        ("models", "model changed"), ("upstream", "earlier stage redone")):
        recorded, current = old.get(kind, {}), new.get(kind, {})
        if kind == "models" and kind not in old:
            if current:
                reasons.append("model contents not recorded (an older version)")
            continue
        keys = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if not keys:
            continue
        if kind == "settings":  # a setting a record lacks came with a newer version (None is a real value)
            shown = [[repr(side[k]) if k in side else "(not recorded)" for side in (recorded, current)]
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
