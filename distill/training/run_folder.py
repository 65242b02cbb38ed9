"""The training run's output folder: what is ours in it, and what `--overwrite` may remove.

`OUTDIR/distill_run.json` marks a folder as a `distill train` (or `distill pretrain`) run. It lists
every top-level entry the run wrote (model files, checkpoint, log, plot, card,
`best/`) and the settings the run was started with. So:

- a folder that holds other files and no such record is never trained into
  and never emptied: the error names what is there; nor is a folder whose
  record is the other command's, or damaged;
- `--overwrite` removes only the listed entries (a user's notes beside them
  stay), and only after every input of the new run was checked;
- `--resume`, and a rerun over a finished run, compare the recorded settings
  with the new ones and name those that differ, as `distill label` does
  (`finished_summary`, `resume_point`; `end_run` is the two commands'
  shared last write, `loop.Loop.begin` their first).

Folders written before this record existed (a `train_log.jsonl`,
`training_summary.json` or `checkpoint.pt` without `distill_run.json`) are
read as finished or refused, never emptied: nobody wrote down their files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from labelers.errors import UsageError

from ..data import DataError
from ..files import write_json_atomic, write_text_atomic
from . import checkpoint

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
            self.record = self._checked(record, manifest)

    def _checked(self, record, manifest: Path) -> dict:
        """The record, when it is this command's and lists the run's entries; else what is there and what to do."""
        there = _listing(self.path)
        found = record.get("kind") if isinstance(record, dict) else None
        if not isinstance(found, str) or not found.startswith("distill "):
            raise DataError(f"{manifest}: is not the record of a distill run (a JSON object with 'kind' and "
                            f"'written'); the folder holds {there} and is left as it is: give --output a new or "
                            "empty folder")
        if found != self.kind:
            raise DataError(f"{self.path}: holds a {found} run ({there}), not a {self.kind} one; it is left as it "
                            f"is: give --output another folder (--overwrite replaces only a {self.kind} run)")
        written = record.get("written")
        if not (isinstance(written, list) and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                                                  for n in written)):
            raise DataError(f"{manifest}: a damaged {self.kind} record: 'written' must list the run's top-level "
                            f"entries by name, so --overwrite cannot tell which of {there} are the run's; it is "
                            "left as it is: give --output another folder, or remove the folder yourself")
        return record

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


# ----- the first and last writes of a run, and the checks before them (`distill train` and `distill pretrain`) ----

def _changed(recorded: dict, settings: dict) -> str:
    flat = lambda d: {**{k: v for k, v in d.items() if k != "inputs"},  # noqa: E731
                      **{f"{k} (content)": v for k, v in (d.get("inputs") or {}).items()}}
    return ", ".join(differences(flat(recorded), flat(settings)))


def finished_summary(folder: RunFolder, done: str, settings: dict, overwrite: bool) -> dict | None:
    """The summary (`done` in the folder) of a finished run of these settings; None when there is none (or
    --overwrite). A finished run of other settings is refused, as a changed resume is."""
    path = folder.path / done
    if overwrite or folder.state not in ("ours", "legacy") or not path.is_file():
        return None
    if folder.settings is not None and folder.settings != settings:
        raise UsageError(f"{folder.path} holds a finished run with other settings ({_changed(folder.settings, settings)});"
                         " --overwrite to train again there, or give another --output")
    return json.loads(path.read_text(encoding="utf-8"))


def resume_point(folder: RunFolder, settings: dict, log: str, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint folder to resume from (None: start at step 0); refuses to mix runs. A run that wrote its
    `log` or a checkpoint continues only with --resume (and its settings) or starts again with --overwrite."""
    out = folder.path
    if overwrite or folder.state == "new":
        return None
    has_run = any((out / n).exists() for n in (checkpoint.FOLDER, checkpoint.FOLDER + ".old", checkpoint.LEGACY_FILE,
                                                log))
    if not has_run:
        return None
    if not resume:
        raise UsageError(f"{out} holds a previous training run: --resume to continue it, --overwrite to start again")
    if folder.state == "legacy" or (out / checkpoint.LEGACY_FILE).exists():
        raise UsageError(f"{out / checkpoint.LEGACY_FILE}: an older distill's checkpoint (a pickle, which could run "
                         "code when loaded) cannot be resumed; --overwrite to start again")
    if folder.settings != settings:
        raise UsageError(f"{out} was started with other settings ({_changed(folder.settings or {}, settings)}); "
                         "rerun with the same settings to resume, or --overwrite to start again")
    return checkpoint.current_folder(out)


def end_run(folder: RunFolder, done: str, summary: dict) -> None:
    """The run's last writes (main process only): its summary `done`, which marks it finished, then the
    checkpoint goes."""
    folder.wrote(done)
    write_text_atomic(folder.path / done, json.dumps(summary, indent=2) + "\n")
    for name in (checkpoint.FOLDER, checkpoint.FOLDER + ".old", checkpoint.FOLDER + ".tmp"):
        shutil.rmtree(folder.path / name, ignore_errors=True)
