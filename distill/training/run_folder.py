"""The training run's output folder: what is ours in it, and what `--overwrite` may remove.

`OUTDIR/distill_run.json` marks a folder as a `distill train` run. It lists
every top-level entry the run wrote (model files, checkpoint, log, plot, card,
`best/`) and the settings the run was started with. So:

- a folder that holds other files and no such record is never trained into
  and never emptied: the error names what is there;
- `--overwrite` removes only the listed entries (a user's notes beside them
  stay), and only after every input of the new run was checked;
- `--resume`, and a rerun over a finished run, compare the recorded settings
  with the new ones and name those that differ, as `distill label` does.

Folders written before this record existed (a `train_log.jsonl`,
`training_summary.json` or `checkpoint.pt` without `distill_run.json`) are
read as finished or refused, never emptied: nobody wrote down their files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..data import DataError
from ..files import write_json_atomic

MANIFEST = "distill_run.json"
LEGACY_MARKERS = ("training_summary.json", "train_log.jsonl", "checkpoint.pt")
KIND = "distill train"


def _listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def differences(old: dict, new: dict, limit: int = 4) -> list[str]:
    """`name old -> new` for each setting that differs between two settings records."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k} {old.get(k, '(not recorded)')!r} -> {new.get(k, '(not recorded)')!r}" for k in keys[:limit]]
    return shown + ([f"+{len(keys) - limit} more"] if len(keys) > limit else [])


class RunFolder:
    """`kind` names the command whose runs the folder holds (`distill train`, `distill pretrain`)."""

    def __init__(self, path: Path, kind: str = KIND, legacy_markers: tuple[str, ...] = LEGACY_MARKERS):
        self.path = Path(path)
        self.kind, self.legacy_markers = kind, legacy_markers
        self.record: dict | None = None
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                record = json.loads(manifest.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{manifest}: not valid JSON ({exc}); it marks a training run: fix it or remove "
                                "the folder yourself") from None
            if not (isinstance(record, dict) and record.get("kind") == kind and isinstance(record.get("written"), list)
                    and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                            for n in record["written"])):
                raise DataError(f"{manifest}: not a {kind} record (kind, written)")
            self.record = record

    @property
    def state(self) -> str:
        """new (absent or empty), ours (a recorded run), legacy (an older run without a record) or foreign."""
        if not self.path.exists():
            return "new"
        if not self.path.is_dir():
            raise DataError(f"{self.path}: --output must be a folder; this is a file")
        if self.record is not None:
            return "ours"
        if not any(self.path.iterdir()):
            return "new"
        if any((self.path / m).exists() for m in self.legacy_markers):
            return "legacy"
        return "foreign"

    def check_usable(self) -> None:
        """Refuse a folder that holds files but is not a training run."""
        if self.state == "foreign":
            raise DataError(f"{self.path}: is not a {self.kind} run (no {MANIFEST}) and holds "
                            f"{_listing(self.path)}; it is left as it is: give --output a new or empty folder")

    @property
    def settings(self) -> dict | None:
        return None if self.record is None else self.record.get("settings")

    def remove_run(self) -> list[str]:
        """Delete what the recorded run wrote (and its record); other entries stay. Returns what was removed."""
        if self.state == "legacy":
            raise DataError(f"{self.path}: holds a training run of an older distill that kept no list of its files "
                            f"({_listing(self.path)}); --overwrite will not guess: remove it yourself or give "
                            "--output a new folder")
        if self.state != "ours":
            return []
        removed = []
        for name in self.record["written"]:
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
            else:
                continue
            removed.append(name)
        (self.path / MANIFEST).unlink(missing_ok=True)
        self.record = None
        return removed

    def claim(self, settings: dict | None) -> None:
        """Mark the folder as this run's, with its settings (a resumed run keeps its list of files)."""
        self.path.mkdir(parents=True, exist_ok=True)
        written = sorted(set((self.record or {}).get("written", [])))
        self.record = {"kind": self.kind, "version": 1, "settings": settings, "written": written}
        write_json_atomic(self.path / MANIFEST, self.record)

    def wrote(self, *names: str) -> None:
        """Record top-level entries the run has written (before writing them, so a kill cannot orphan one)."""
        if self.record is None:  # a Trainer used as a library, without run_train's checks: record its files all
            self.claim(None)     # the same, so that --overwrite can still remove exactly them
        new = sorted(set(self.record["written"]) | set(names))
        if new != self.record["written"]:
            self.record["written"] = new
            write_json_atomic(self.path / MANIFEST, self.record)

    def save_model(self, encoder, name: str | None = None) -> None:
        """The encoder as a sentence-transformers folder: `name` (best/) is replaced whole, the run folder itself
        entry by entry. It is written to a temp folder first, so the record names every entry before it exists."""
        tmp = self.path / (f"{name}.tmp" if name else "model.tmp")
        self.wrote(tmp.name, *([name] if name else []))
        shutil.rmtree(tmp, ignore_errors=True)
        encoder.save(tmp)
        if name:
            shutil.rmtree(self.path / name, ignore_errors=True)
            os.replace(tmp, self.path / name)
            return
        entries = sorted(p.name for p in tmp.iterdir())
        self.wrote(*entries)
        for entry in entries:
            if (self.path / entry).is_dir():
                shutil.rmtree(self.path / entry)
            os.replace(tmp / entry, self.path / entry)
        tmp.rmdir()
