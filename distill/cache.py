"""`distill cache`: what the embedding cache holds, and clearing it.

`distill eval`, `mine`, `generate` and training's evaluations keep corpus and
query embeddings on disk (`index.EmbeddingCache`, `~/.cache/distill/embeddings`
or `$DISTILL_CACHE/embeddings`): one entry per (encoder weights and settings,
texts), rows x dim float32, so 4 x 384 bytes per passage for MiniLM (1.5 GB
per million passages). Nothing is evicted on its own; every trained student
adds entries. `distill cache` lists the entries, most recently used first,
with their size; `--clear` removes them all, or with `--older-than DAYS` those
not used for that long. Only folders the cache wrote (named by a key, with its
`meta.json` marker) are entries, and only the files it wrote are removed: a
mistyped `--cache-dir` lists other folders as not ours and deletes nothing.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from labelers.errors import UsageError

from .config import add_command
from .index import cache_entries, default_cache_dir, remove_entry


@dataclass(kw_only=True)
class CacheConfig:
    cache_dir: Path = field(default_factory=default_cache_dir, metadata={"help": "the embedding cache's folder"})
    clear: bool = field(default=False, metadata={"help": "remove entries (all of them, or see --older-than)"})
    older_than: float | None = field(default=None, metadata={
        "help": "with --clear: only entries not used for this many days"})


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def run_cache(cfg: CacheConfig) -> dict:
    if cfg.older_than is not None and not cfg.clear:
        raise UsageError("--older-than goes with --clear")
    if cfg.older_than is not None and cfg.older_than < 0:
        raise UsageError("--older-than must be >= 0 days")
    entries, others = cache_entries(cfg.cache_dir)
    now = time.time()
    total = sum(e.size_bytes for e in entries)
    not_ours = (f"; {len(others)} other folder{'s' * (len(others) != 1)} there are not cache entries and are left "
                f"alone ({', '.join(p.name for p in others[:3])}{', ...' if len(others) > 3 else ''})" if others else "")
    if not cfg.clear:
        print(f"{cfg.cache_dir}: {len(entries)} entries, {_size(total)}{not_ours}")
        for e in entries:
            state = "" if e.complete else f"  (partial: {e.rows_done} rows encoded)"
            print(f"  {e.folder.name}  {e.kind or '?':<7} {e.rows:>9} x {e.dim:<5} {_size(e.size_bytes):>10}  "
                  f"used {(now - e.last_used) / 86400:.1f} days ago{state}")
        return {"entries": len(entries), "bytes": total, "not_entries": len(others)}
    chosen = [e for e in entries if cfg.older_than is None or now - e.last_used > cfg.older_than * 86400]
    kept = {}
    for e in chosen:
        left = remove_entry(e)  # only the files the cache wrote; anything else in the folder stays
        if left:
            kept[e.folder.name] = left
    freed = sum(e.size_bytes for e in chosen)
    print(f"{cfg.cache_dir}: removed {len(chosen)} of {len(entries)} entries, {_size(freed)} freed{not_ours}")
    for name, left in kept.items():
        print(f"  {name}: kept {', '.join(left)} (not written by the cache)")
    return {"removed": len(chosen), "bytes": freed, "not_entries": len(others)}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "cache", CacheConfig, run_cache, help="list or clear the embedding cache",
                description=__doc__.split("\n\n")[0])
