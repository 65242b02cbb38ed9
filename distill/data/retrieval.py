"""Retrieval sets: a corpus, queries and one split's qrels, read and cross-checked.

A retrieval set is a corpus, queries and qrels, read from a BEIR-style folder
(`corpus.*`, `queries.*`, `qrels/<split>.tsv`) whose tables may be JSON Lines,
Parquet or saved Hugging Face datasets. Corpus and queries are held as Arrow
tables; qrels as `{query_id: {passage_id: score}}`, the form pytrec_eval and
BEIR use. All checks name file, line and field (see `errors`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError, Problem, ProblemLog
from .tables import (CORPUS_FIELDS, QRELS_FIELDS, QUERY_FIELDS, drop_duplicate_ids, drop_unknown_ids,
                     read_table)


logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
# Data sets shipped inside the package, usable as `--data NAME`.
EMBEDDED_SETS: dict[str, Path] = {"squad-mini": RESOURCES / "squad_mini", "squad-qa": RESOURCES / "squad_qa"}
TABLE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")


def format_passage(title: str | None, text: str) -> str:
    """The string a passage is embedded as: BEIR's `title + " " + text`."""
    return f"{title} {text}" if title else text


@dataclass
class Corpus:
    """Passages as an Arrow table with columns id, text, title, doc_id, line."""

    table: pa.Table
    path: Path

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> pa.ChunkedArray:
        return self.table["id"]

    def ids_at(self, rows: np.ndarray) -> list[str]:
        return pc.take(self.table["id"], pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    @functools.cached_property
    def _id_array(self) -> pa.Array:
        return self.table["id"].combine_chunks()

    def rows_of(self, ids: list[str]) -> np.ndarray:
        """Row index of each passage id, -1 where the corpus has no such id (vectorised, no id dict)."""
        found = pc.index_in(pa.array(ids, pa.string()), value_set=self._id_array)
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def rows_of_each(self, id_lists: list[list[str]]) -> list[np.ndarray]:
        """`rows_of` for many id lists with one lookup (per-list calls each rebuild the id hash table)."""
        flat = self.rows_of([i for ids in id_lists for i in ids])
        return np.split(flat, np.cumsum([len(ids) for ids in id_lists])[:-1]) if id_lists else []

    def passages_at(self, rows: np.ndarray, include_title: bool = True) -> list[str]:
        """Passage strings (see `format_passage`) at the given rows, in that order."""
        taken = self.table.select(["title", "text"]).take(pa.array(np.asarray(rows, dtype=np.int64)))
        texts = taken["text"].to_pylist()
        if not include_title:
            return texts
        return [format_passage(t, x) for t, x in zip(taken["title"].to_pylist(), texts)]

    def iter_passages(self, include_title: bool = True, batch_rows: int = 65536) -> Iterator[list[str]]:
        """Passage strings in corpus order, `batch_rows` at a time."""
        columns = ["title", "text"] if include_title else ["text"]
        for batch in self.table.select(columns).to_batches(max_chunksize=batch_rows):
            texts = batch.column("text").to_pylist()
            if include_title:
                titles = batch.column("title").to_pylist()
                texts = [format_passage(t, x) for t, x in zip(titles, texts)]
            yield texts

    def passage_lengths(self) -> np.ndarray:
        """Characters per passage, for length-sorted encoding without decoding text."""
        lengths = pc.utf8_length(self.table["text"]).to_numpy(zero_copy_only=False)
        titles = pc.fill_null(pc.utf8_length(self.table["title"]), 0).to_numpy(zero_copy_only=False)
        return lengths + titles

    def fingerprint(self) -> str:
        """sha256 of ids, titles and texts; independent of how the table is chunked."""
        hashers = {}
        for name in ("id", "title", "text"):
            data, lengths = hashlib.sha256(), hashlib.sha256()
            for chunk in self.table[name].chunks:
                filled = pc.fill_null(chunk, "")
                offsets = np.frombuffer(filled.buffers()[1], dtype=np.int32)[filled.offset:filled.offset + len(filled) + 1]
                values = filled.buffers()[2]
                if values is not None:
                    data.update(memoryview(values)[offsets[0]:offsets[-1]])
                lengths.update(np.diff(offsets).astype("<i8").tobytes())
            hashers[name] = data.hexdigest() + lengths.hexdigest()
        return hashlib.sha256("|".join(hashers[n] for n in sorted(hashers)).encode()).hexdigest()[:32]


@dataclass
class Queries:
    """Queries as an Arrow table with columns id, text, answers, positives, line."""

    table: pa.Table
    path: Path

    def __len__(self) -> int:
        return self.table.num_rows

    def select(self, query_ids: list[str]) -> Queries:
        mask = pc.is_in(self.table["id"], value_set=pa.array(query_ids, pa.string()))
        return Queries(self.table.filter(mask), self.path)

    @property
    def ids(self) -> list[str]:
        return self.table["id"].to_pylist()

    @property
    def texts(self) -> list[str]:
        return self.table["text"].to_pylist()


@dataclass
class RetrievalSet:
    """Corpus, queries and one split's qrels; `queries` holds only that split's queries."""

    corpus: Corpus
    queries: Queries
    qrels: dict[str, dict[str, int]]
    split: str
    problems: ProblemLog = field(default_factory=ProblemLog)

    @property
    def labelled(self) -> bool:
        """False for a split of queries without relevance labels (a query log, questions with answers only)."""
        return bool(self.qrels)

    def positives(self, qid: str) -> list[str]:
        """The query's relevant passage ids (qrels grade > 0), in qrels order; none for an unlabelled query."""
        return [pid for pid, grade in self.qrels.get(qid, {}).items() if grade > 0]

    def fingerprint(self) -> str:
        """Digest of the corpus content, the queries file and this split's qrels: a stage's input identity."""
        from ..files import file_digest

        path = Path(self.queries.path)
        queries = file_digest(path) if path.is_file() else str(path)
        qrels = json.dumps(self.qrels, sort_keys=True)
        return hashlib.sha256(f"{self.corpus.fingerprint()}|{queries}|{qrels}".encode()).hexdigest()[:32]


def resolve_data_dir(data: str | Path) -> Path:
    """A folder path, or the name of an embedded set (see `EMBEDDED_SETS`)."""
    path = Path(data)
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path}: --data must be a folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
        return path
    if str(data) in EMBEDDED_SETS:
        return EMBEDDED_SETS[str(data)]
    raise DataError(f"{data}: no such folder (embedded sets: {', '.join(sorted(EMBEDDED_SETS))})")


def _table_path(folder: Path, name: str) -> Path | None:
    for suffix in TABLE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return folder / name if (folder / name).is_dir() else None


def has_table(folder: Path, name: str) -> bool:
    """Whether a BEIR-style folder holds a `name` table (corpus, queries) in any supported form."""
    return _table_path(Path(folder), name) is not None


def data_files(folder: Path) -> list[Path]:
    """The files a retrieval set is read from: corpus, queries and qrels tables (a saved datasets folder's files
    too), sorted."""
    folder = Path(folder)
    files: list[Path] = []
    for name in ("corpus", "queries"):
        path = _table_path(folder, name)
        if path is not None:
            files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if (folder / "qrels").is_dir():
        files += [p for p in (folder / "qrels").rglob("*") if p.is_file()]
    return sorted(files)


def data_digest(data: str | Path) -> str:
    """sha256 over a retrieval set's files (names relative to the folder, and bytes): its content identity."""
    from ..files import file_digest

    folder = resolve_data_dir(data)
    entries = [(str(p.relative_to(folder)), file_digest(p)) for p in data_files(folder)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:32]


def _find_table(folder: Path, name: str) -> Path:
    path = _table_path(folder, name)
    if path is None:
        raise DataError(f"{folder}: no {name}.jsonl, {name}.parquet or {name}/ (saved datasets folder) found")
    return path


def _non_empty(corpus: Corpus, log: ProblemLog) -> Corpus:
    if not len(corpus):
        skipped = f" ({log.summary()})" if log.total else ""
        raise DataError(f"{corpus.path}: the corpus has no passages{skipped}")
    return corpus


def _find_qrels(folder: Path, split: str) -> Path | None:
    qrels_dir = folder / "qrels"
    for suffix in (".tsv", ".txt", ".trec") + TABLE_SUFFIXES:
        if (qrels_dir / f"{split}{suffix}").is_file():
            return qrels_dir / f"{split}{suffix}"
    return qrels_dir / split if (qrels_dir / split).is_dir() else None


def _read_checked(path: Path, fields, log: ProblemLog) -> pa.Table:
    try:
        table = read_table(path, fields, log)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot be read: {exc}") from exc
    id_key = "_id" if path.suffix in {".jsonl", ".json", ".ndjson"} else "id"
    return drop_duplicate_ids(table, path, "id", id_key, log)


def load_corpus(path: Path, log: ProblemLog | None = None) -> Corpus:
    """A corpus table from one file or datasets folder."""
    log = log if log is not None else ProblemLog()
    return Corpus(_read_checked(path, CORPUS_FIELDS, log), path)


def load_queries(path: Path, log: ProblemLog | None = None) -> Queries:
    """A queries table from one file or datasets folder."""
    log = log if log is not None else ProblemLog()
    return Queries(_read_checked(path, QUERY_FIELDS, log), path)


def load_corpus_of(data: str | Path, skip_invalid: bool = False) -> tuple[Corpus, ProblemLog]:
    """The corpus of a BEIR-style folder (or embedded set) alone: raw text needs no queries or qrels."""
    log = ProblemLog(skip_invalid=skip_invalid)
    return _non_empty(load_corpus(_find_table(resolve_data_dir(data), "corpus"), log), log), log


def load_retrieval_set(data: str | Path, split: str = "test", skip_invalid: bool = False,
                       unlabelled: bool = False) -> RetrievalSet:
    """Read and cross-check a BEIR-style folder for one split.

    Qrels come from `qrels/<split>.*`; when that file is absent, from the
    queries' own `positives` field. Qrels naming unknown queries or passages
    are errors (or, with `skip_invalid`, are dropped and counted).

    With `unlabelled`, a split that has neither is a split of queries without
    relevance labels: every query of the folder that no other split's qrels
    judge (so held-out test queries never leak into training), with empty qrels.
    """
    folder = resolve_data_dir(data)
    log = ProblemLog(skip_invalid=skip_invalid)
    corpus = _non_empty(load_corpus(_find_table(folder, "corpus"), log), log)
    queries = load_queries(_find_table(folder, "queries"), log)
    qrels_path = _find_qrels(folder, split)
    if qrels_path is not None:
        qrels = _load_qrels(qrels_path, queries, corpus, log)
        if not qrels:
            skipped = f" ({log.summary()})" if log.total else ""
            raise DataError(f"{qrels_path}: split {split!r} is empty: no query has a relevant passage (score > 0)"
                            + skipped)
    else:
        qrels = _qrels_from_positives(queries, corpus, log)
        if not qrels and unlabelled:
            return _unlabelled_split(folder, split, corpus, queries, log)
        if not qrels:
            available = sorted(p.stem for p in (folder / "qrels").glob("*")) if (folder / "qrels").is_dir() else []
            raise DataError(f"{folder}: no qrels/{split}.tsv and no query has \"positives\""
                            + (f" (splits here: {', '.join(available)})" if available else ""))
    split_queries = queries.select(list(qrels))
    logger.info("%s: %d passages, %d %s queries; %s", folder, len(corpus), len(split_queries), split, log.summary())
    return RetrievalSet(corpus, split_queries, qrels, split, log)


def _unlabelled_split(folder: Path, split: str, corpus: Corpus, queries: Queries, log: ProblemLog) -> RetrievalSet:
    judged: set[str] = set()
    for other in sorted((folder / "qrels").glob("*")) if (folder / "qrels").is_dir() else []:
        if other.is_file() and other.suffix in (".tsv", ".txt", ".trec") + TABLE_SUFFIXES:
            judged.update(read_table(other, QRELS_FIELDS, ProblemLog(skip_invalid=True))["query-id"].to_pylist())
    ids = [q for q in queries.ids if q not in judged]
    if not ids:
        splits = sorted(p.stem for p in (folder / "qrels").glob("*") if p.is_file())
        raise DataError(f"{folder}: no qrels/{split}.tsv (splits here: {', '.join(splits)}), and every query is "
                        "judged in another split")
    if judged:
        logger.info("%s: split %s: %d queries without qrels (%d judged in other splits left out)", folder, split,
                    len(ids), len(queries) - len(ids))
    return RetrievalSet(corpus, queries.select(ids), {}, split, log)


def _load_qrels(path: Path, queries: Queries, corpus: Corpus, log: ProblemLog) -> dict[str, dict[str, int]]:
    table = read_table(path, QRELS_FIELDS, log)
    table = drop_unknown_ids(table, path, "query-id", "query-id", queries.table["id"], queries.path.name, log)
    table = drop_unknown_ids(table, path, "corpus-id", "corpus-id", corpus.table["id"], corpus.path.name, log)
    qrels: dict[str, dict[str, int]] = {}
    for qid, pid, score in zip(*(table[c].to_pylist() for c in ("query-id", "corpus-id", "score"))):
        qrels.setdefault(qid, {})[pid] = score
    return {qid: docs for qid, docs in qrels.items() if any(s > 0 for s in docs.values())}


def load_qrels_for(path: Path, rset: RetrievalSet, skip_invalid: bool = False) -> dict[str, dict[str, int]]:
    """A qrels file (query-id, corpus-id, score; TSV, JSON Lines or Parquet) checked against `rset`'s queries and
    corpus, e.g. a few labelled queries given to calibrate against (`--calibration-qrels`)."""
    return _load_qrels(Path(path), rset.queries, rset.corpus, ProblemLog(skip_invalid=skip_invalid))


def _qrels_from_positives(queries: Queries, corpus: Corpus, log: ProblemLog) -> dict[str, dict[str, int]]:
    known = set(corpus.table["id"].to_pylist())
    qrels: dict[str, dict[str, int]] = {}
    for qid, positives, line in zip(*(queries.table[c].to_pylist() for c in ("id", "positives", "line"))):
        unknown = [p for p in positives if p not in known]
        if unknown:
            log.report(Problem(str(queries.path), line, "positives",
                               f"unknown id {unknown[0]!r} (not in {corpus.path.name})", "unknown id"))
            continue
        if positives:
            qrels[qid] = {p: 1 for p in positives}
    return qrels
