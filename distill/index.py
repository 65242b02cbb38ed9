"""Nearest-neighbour search over passage embeddings with faiss.

`build_index` makes an inner-product index (exact `flat`, or `ivf` / `hnsw`
for large corpora), on the GPU when faiss has GPUs; `search` queries it in
chunks so memory stays bounded by the chunk, never a full query x corpus
matrix. `EmbeddingCache` keeps corpus (and query) embeddings on disk, keyed by
(model weights, encoder settings, text content), memory-mapped, and filled
chunk by chunk so a killed encoding resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from labelers.errors import UsageError

from .files import write_json_atomic

logger = logging.getLogger(__name__)

ADD_CHUNK_ROWS = 65536


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a base dependency
        raise ImportError("faiss is missing: pip install faiss-cpu (or the [gpu] extra for faiss-gpu)") from exc
    return faiss


def faiss_gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@dataclass
class IndexConfig:
    """Which faiss index to build. Scores are inner products (cosine on normalised vectors)."""

    kind: str = "flat"          # flat | ivf | hnsw
    nlist: int | None = None    # ivf cells; default 4·sqrt(n)
    nprobe: int = 32            # ivf cells visited per query
    hnsw_m: int = 32            # hnsw links per node
    ef_search: int = 128        # hnsw search breadth
    gpu: str = "auto"           # auto | yes | no

    def __post_init__(self) -> None:
        if self.kind not in INDEX_FACTORIES:
            raise UsageError(f"index kind {self.kind!r} is not known; choose one of {sorted(INDEX_FACTORIES)}")
        if self.gpu not in ("auto", "yes", "no"):
            raise UsageError(f"gpu must be auto, yes or no, got {self.gpu!r}")


def _flat(dim: int, n: int, cfg: IndexConfig):
    faiss = _faiss()
    return faiss.IndexFlatIP(dim)


def _ivf(dim: int, n: int, cfg: IndexConfig):
    faiss = _faiss()
    nlist = cfg.nlist or max(1, int(4 * math.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(cfg.nprobe, nlist)
    return index


def _hnsw(dim: int, n: int, cfg: IndexConfig):
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = cfg.ef_search
    return index


INDEX_FACTORIES: dict[str, Callable] = {"flat": _flat, "ivf": _ivf, "hnsw": _hnsw}


def build_index(embeddings: np.ndarray, cfg: IndexConfig | None = None, rng: np.random.Generator | None = None):
    """An index over `embeddings` [n, dim] (a memory-mapped array is read in chunks)."""
    faiss = _faiss()
    cfg = cfg or IndexConfig()
    n, dim = embeddings.shape
    index = INDEX_FACTORIES[cfg.kind](dim, n, cfg)
    gpus = faiss_gpu_count()
    if cfg.gpu == "yes" and gpus == 0:
        raise RuntimeError("--index-gpu yes, but faiss sees no GPU (install the [gpu] extra: faiss-gpu)")
    if gpus and cfg.gpu != "no" and cfg.kind != "hnsw":  # faiss has no GPU HNSW
        logger.info("faiss index on %d GPU(s)", gpus)
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        rng = rng or np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(n, 256 * getattr(index, "nlist", 1)), replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    for start in range(0, n, ADD_CHUNK_ROWS):
        index.add(np.ascontiguousarray(embeddings[start:start + ADD_CHUNK_ROWS], dtype=np.float32))
    return index


def search(index, queries: np.ndarray, k: int, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products and row numbers: ([nq, k] float32, [nq, k] int64); -1 pads short lists."""
    k = min(k, index.ntotal)
    scores = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk_rows):
        chunk = np.ascontiguousarray(queries[start:start + chunk_rows], dtype=np.float32)
        scores[start:start + len(chunk)], rows[start:start + len(chunk)] = index.search(chunk, k)
    return scores, rows


@dataclass(frozen=True)
class TextSource:
    """Strings to embed, as the cache needs them: a kind (query | passage), a
    content fingerprint, a length, and their batches in order."""

    kind: str
    fingerprint: str
    length: int
    batches: Callable[[int], Iterator[list[str]]]

    def __len__(self) -> int:
        return self.length


def passage_source(corpus, include_title: bool = True) -> TextSource:
    return TextSource("passage", f"{corpus.fingerprint()}|title={include_title}", len(corpus),
                      lambda rows: corpus.iter_passages(include_title=include_title, batch_rows=rows))


def query_source(texts: list[str]) -> TextSource:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return TextSource("query", digest.hexdigest()[:32], len(texts),
                      lambda rows: (texts[i:i + rows] for i in range(0, len(texts), rows)))


def encode_into(out: np.ndarray, encoder, source: TextSource, *, rows_done: int = 0, chunk_rows: int = 16384,
                batch_size: int = 64, show_progress: bool = False,
                after_chunk: Callable[[int], None] | None = None) -> None:
    """Fill `out[rows_done:]` with the source's embeddings, `chunk_rows` strings at a time.

    Only one chunk of strings exists at once; `after_chunk(rows_done)` runs
    after each chunk (the cache flushes and records progress there).
    """
    plural = {"query": "queries", "passage": "passages"}.get(source.kind, source.kind)
    with tqdm(total=len(source), initial=rows_done, desc=f"encode {plural}", unit=source.kind,
              disable=not show_progress, dynamic_ncols=True) as bar:
        row = 0
        for texts in source.batches(chunk_rows):
            end = row + len(texts)
            if end > rows_done:
                skip = max(0, rows_done - row)
                out[row + skip:end] = encoder.encode(texts[skip:], kind=source.kind, batch_size=batch_size,
                                                     output_dtype=out.dtype)
                if after_chunk is not None:
                    after_chunk(end)
                bar.update(len(texts) - skip)
            row = end


def default_cache_dir() -> Path:
    root = os.environ.get("DISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distill")
    return Path(root) / "embeddings"


@dataclass
class EmbeddingCache:
    """Embeddings on disk: `<root>/<key>/embeddings.npy`, memory-mapped.

    The key hashes the encoder's weights and settings, the texts' content and
    kind (passages also how they are formatted), so any change gives a new
    entry. Encoding runs in chunks of `chunk_rows` strings; after each chunk
    the rows are flushed and `progress.json` records how many are done, so a
    killed run resumes (with the same batches, hence the same floats).
    """

    root: Path
    chunk_rows: int = 16384

    def key(self, encoder, source: TextSource, dtype: str) -> str:
        parts = {"weights": encoder.weights_fingerprint(), "encoder": asdict(encoder.config), "kind": source.kind,
                 "texts": source.fingerprint, "dtype": dtype}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def embeddings(self, encoder, source: TextSource, *, batch_size: int = 64, dtype: str = "float32",
                   show_progress: bool = False) -> np.ndarray:
        folder = Path(self.root) / self.key(encoder, source, dtype)
        folder.mkdir(parents=True, exist_ok=True)
        array_path, progress_path = folder / "embeddings.npy", folder / "progress.json"
        n, dim = len(source), encoder.dimension
        progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"rows_done": 0}
        if progress["rows_done"] == 0 or not array_path.exists():
            progress = {"rows_done": 0}
            write_json_atomic(folder / "meta.json", {"writer": CACHE_MARKER, "kind": source.kind, "rows": n,
                                                     "dim": dim, "dtype": dtype})
            np.lib.format.open_memmap(array_path, mode="w+", dtype=np.dtype(dtype), shape=(n, dim)).flush()
        done = progress["rows_done"]
        if done < n:
            logger.info("encoding %d %ss into %s (%d cached)", n - done, source.kind, folder, done)
            out = np.load(array_path, mmap_mode="r+")

            def checkpoint(rows_done: int) -> None:
                out.flush()
                write_json_atomic(progress_path, {"rows_done": rows_done})

            encode_into(out, encoder, source, rows_done=done, chunk_rows=self.chunk_rows, batch_size=batch_size,
                        show_progress=show_progress, after_chunk=checkpoint)
            del out
        else:
            logger.info("%s embeddings from cache %s", source.kind, folder)
        os.utime(folder)  # the entry's time is when it was last used (`distill cache` lists and prunes by it)
        return np.load(array_path, mmap_mode="r")

    def corpus_embeddings(self, encoder, corpus, *, include_title: bool = True, **options) -> np.ndarray:
        return self.embeddings(encoder, passage_source(corpus, include_title), **options)


CACHE_MARKER = "distill embedding cache"  # meta.json's "writer": what makes a folder one of our entries
ENTRY_FILES = ("embeddings.npy", "progress.json", "meta.json")  # every file an entry holds, and all we remove
ENTRY_NAME = re.compile(r"[0-9a-f]{24}")  # EmbeddingCache.key


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    kind: str | None        # query | passage
    rows: int
    dim: int
    rows_done: int
    size_bytes: int
    last_used: float        # seconds since the epoch

    @property
    def complete(self) -> bool:
        return self.rows_done >= self.rows


def _entry_meta(folder: Path) -> dict | None:
    """The folder's meta.json when the folder is one of our entries, else None.

    Ours: named by a cache key, with a meta.json that carries our marker; or, from before the marker was written,
    a meta.json of exactly the keys this cache wrote then (kind, rows, dim, dtype) beside a progress.json."""
    if not ENTRY_NAME.fullmatch(folder.name) or not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        legacy = (isinstance(meta, dict) and set(meta) == {"kind", "rows", "dim", "dtype"}
                  and "rows_done" in json.loads((folder / "progress.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) and (meta.get("writer") == CACHE_MARKER or legacy) else None


def cache_entries(root: Path) -> tuple[list[CacheEntry], list[Path]]:
    """(every entry of an embedding cache, most recently used first; the folders there that are not entries).

    Only folders that `_entry_meta` recognises are entries: a mistyped `--cache-dir` (a project folder that
    happens to hold an `embeddings.npy`) lists them as not ours, and `distill cache --clear` leaves them."""
    entries, others = [], []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        meta = _entry_meta(folder)
        if meta is None:
            others.append(folder)
            continue
        try:
            rows_done = json.loads((folder / "progress.json").read_text()).get("rows_done", 0)
        except (OSError, ValueError):
            rows_done = 0
        size = sum((folder / name).stat().st_size for name in ENTRY_FILES if (folder / name).is_file())
        entries.append(CacheEntry(folder, meta.get("kind"), int(meta.get("rows", 0)), int(meta.get("dim", 0)),
                                  int(rows_done), size, folder.stat().st_mtime))
    return sorted(entries, key=lambda e: -e.last_used), others


def remove_entry(entry: CacheEntry) -> list[str]:
    """Delete the files the cache wrote in `entry`, then the folder if nothing else is left in it; returns the
    names of anything else found there (kept)."""
    for name in ENTRY_FILES:
        (entry.folder / name).unlink(missing_ok=True)
    left = sorted(p.name for p in entry.folder.iterdir())
    if not left:
        entry.folder.rmdir()
    return left


def embeddings(encoder, source: TextSource, *, cache_dir: Path | None, batch_size: int = 64,
               show_progress: bool = False) -> np.ndarray:
    """Embeddings of `source`, from (and into) the cache when `cache_dir` is given."""
    if cache_dir is None:
        out = np.empty((len(source), encoder.dimension), dtype=np.float32)
        encode_into(out, encoder, source, batch_size=batch_size, show_progress=show_progress)
        return out
    return EmbeddingCache(Path(cache_dir)).embeddings(encoder, source, batch_size=batch_size,
                                                      show_progress=show_progress)


def corpus_embeddings(encoder, corpus, *, cache_dir: Path | None, include_title: bool = True,
                      batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    """Corpus embeddings, from (and into) the cache when `cache_dir` is given."""
    return embeddings(encoder, passage_source(corpus, include_title), cache_dir=cache_dir, batch_size=batch_size,
                      show_progress=show_progress)
