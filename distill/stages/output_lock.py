"""One writer per output: `<output>.lock`, held by the driver of a job from before it touches the output (or its
`.parts/` folder) until it is done.

Two drivers writing one output would write the same part files at once and kill each other's actors; the second
is refused up front instead, with one line naming the holder (pid, host, start time) from the lock file. The lock
itself is the kernel's `flock` on that file, not the file's existence: it is released when its holder ends in any
way, kill -9 included, so a stale lock never blocks a rerun (the dead holder's file is overwritten). On NFS,
Linux turns `flock` into a lock the server keeps, which also holds across hosts; the server frees the lock of a
host that died when that host's lease runs out.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from labelers.errors import UsageError


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    """`with OutputLock(output):` the job's exclusive right to write `output`; UsageError when another holds it."""

    def __init__(self, output: Path):
        self.output, self.path, self.fd = Path(output), lock_path(Path(output)), None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UsageError(f"{self.output} is being written by another distill job ({holder}): wait for it "
                                 "to end, or stop it and rerun this command to resume its work") from None
            try:  # the holder we waited on may have removed the file after we opened it: lock the one there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # before the lock goes: a waiter that opened this file sees it is gone
        os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> str:
    """'pid 123 on host, started 2026-01-02 03:04:05 +0000' from the lock file (its holder may still be writing it)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        found = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"pid {found['pid']} on {found['host']}, started {found['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "one that is starting up"
