"""Validated columnar tables for corpus, queries and qrels.

Records from any source are checked field by field and packed into Arrow
record batches of `CHUNK_ROWS` rows, so a corpus of millions of passages is
held as Arrow buffers, never as millions of Python dicts. Each table keeps a
`line` column so that later checks (duplicate ids, unknown ids) can still name
the line of the offending record.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import Problem, ProblemLog
from .sources import Record, iter_records

CHUNK_ROWS = 65536
LINE_BREAKING = frozenset("\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines() or a TSV splits on


class _Invalid(Exception):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _blank(value: str) -> bool:
    """Nothing to read: only whitespace and invisible format characters (zero-width space U+200B, joiners, BOM:
    Unicode category Cf), which `str.strip` keeps."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in value)


def _id(value: object) -> str:
    if isinstance(value, bool) or value is None:
        raise _Invalid("is missing" if value is None else "must be a string", "missing id" if value is None else "bad id")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {type(value).__name__}", "bad id")
    if _blank(value):
        raise _Invalid("is empty", "empty id")
    if any(c in value for c in LINE_BREAKING):
        raise _Invalid(f"{value!r} holds a tab or line break (TREC runs, qrels and TSV exports could not hold it)",
                       "bad id")
    return value


def _text(value: object) -> str:
    if value is None:
        raise _Invalid("is missing", "missing text")
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {type(value).__name__}", "bad text")
    if _blank(value):
        raise _Invalid("is empty" if not value.strip() else "holds only invisible characters (zero-width spaces)",
                       "empty text")
    return value


def _optional_text(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {type(value).__name__}", "bad field")
    return value


def _optional_id(value: object) -> str | None:
    return None if value is None or value == "" else _id(value)


def _str_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise _Invalid("must be a list of strings", "bad list")
    return [str(v) for v in value]


def _answers(value: object) -> list[str]:
    """Reference answers: each must have something to score (an empty answer would stop labelling hours in)."""
    answers = _str_list(value)
    for i, answer in enumerate(answers):
        if _blank(answer):
            raise _Invalid(f"answer {i} ({answer!r}) is empty: remove it (a query without answers is scored by "
                           "query likelihood)", "empty answer")
    return answers


def _score(value: object) -> int:
    try:
        score = float(value)  # accepts 1, "1", 1.0
    except (TypeError, ValueError):
        raise _Invalid(f"must be an integer, got {value!r}", "bad score") from None
    if not score.is_integer():
        raise _Invalid(f"must be an integer, got {value!r}", "bad score")
    return int(score)


@dataclass(frozen=True)
class FieldSpec:
    """A column: its name, the keys accepted for it in input files, and its check."""

    name: str
    aliases: tuple[str, ...]
    convert: Callable[[object], object]
    arrow_type: pa.DataType
    required: bool = True


CORPUS_FIELDS = (
    FieldSpec("id", ("_id", "id"), _id, pa.string()),
    FieldSpec("text", ("text",), _text, pa.string()),
    FieldSpec("title", ("title",), _optional_text, pa.string(), required=False),
    FieldSpec("doc_id", ("doc_id",), _optional_id, pa.string(), required=False),
)
QUERY_FIELDS = (
    FieldSpec("id", ("_id", "id"), _id, pa.string()),
    FieldSpec("text", ("text",), _text, pa.string()),
    FieldSpec("answers", ("answers",), _answers, pa.list_(pa.string()), required=False),
    FieldSpec("positives", ("positives",), _str_list, pa.list_(pa.string()), required=False),
)
QRELS_FIELDS = (
    FieldSpec("query-id", ("query-id", "query_id", "qid"), _id, pa.string()),
    FieldSpec("corpus-id", ("corpus-id", "corpus_id", "pid", "docid"), _id, pa.string()),
    FieldSpec("score", ("score", "relevance"), _score, pa.int32()),
)


def _schema(fields: Iterable[FieldSpec]) -> pa.Schema:
    return pa.schema([pa.field(f.name, f.arrow_type) for f in fields] + [pa.field("line", pa.int64())])


def read_table(path: Path, fields: tuple[FieldSpec, ...], log: ProblemLog) -> pa.Table:
    """Read and check every record of `path` into an Arrow table (plus `line`)."""
    schema = _schema(fields)
    batches: list[pa.RecordBatch] = []
    columns: dict[str, list] = {name: [] for name in schema.names}

    def flush() -> None:
        if columns["line"]:
            batches.append(pa.RecordBatch.from_pydict(columns, schema=schema))
            for values in columns.values():
                values.clear()

    records: Iterable[Record] = iter_records(path)
    for line, record in records:
        if isinstance(record, Problem):
            log.report(record)
            continue
        try:
            row = _check_record(record, fields)
        except _FieldProblem as exc:
            log.report(Problem(str(path), line, exc.field, str(exc.invalid), exc.invalid.kind))
            continue
        for name, value in row.items():
            columns[name].append(value)
        columns["line"].append(line)
        if len(columns["line"]) >= CHUNK_ROWS:
            flush()
    flush()
    return pa.Table.from_batches(batches, schema=schema)


class _FieldProblem(Exception):
    def __init__(self, field: str, invalid: _Invalid):
        self.field, self.invalid = field, invalid


def _check_record(record: dict, fields: tuple[FieldSpec, ...]) -> dict:
    row = {}
    for spec in fields:
        key = next((k for k in spec.aliases if k in record), None)
        value = record.get(key) if key else None
        if value is None and spec.required:
            raise _FieldProblem(spec.aliases[0], _Invalid("is missing", f"missing {spec.name}"))
        try:
            row[spec.name] = spec.convert(value)
        except _Invalid as invalid:
            raise _FieldProblem(key or spec.aliases[0], invalid) from None
    return row


def drop_duplicate_ids(table: pa.Table, path: Path, column: str, field_name: str, log: ProblemLog) -> pa.Table:
    """Keep the first record of each id; every later one is a problem."""
    if table.num_rows == 0:
        return table
    codes = pc.dictionary_encode(table[column].combine_chunks()).indices.to_numpy(zero_copy_only=False)
    _, first_rows = np.unique(codes, return_index=True)
    if len(first_rows) == table.num_rows:
        return table
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[first_rows] = True
    lines = table["line"].to_numpy()
    first_line_of_code = np.empty(codes.max() + 1, dtype=np.int64)
    first_line_of_code[codes[first_rows]] = lines[first_rows]
    ids = table[column]
    for row in np.flatnonzero(~keep):
        log.report(Problem(str(path), int(lines[row]), field_name,
                           f"duplicate id {ids[int(row)].as_py()!r} (first on line {first_line_of_code[codes[row]]})",
                           "duplicate id"))
    return table.filter(pa.array(keep))


def drop_unknown_ids(table: pa.Table, path: Path, column: str, field_name: str, known: pa.ChunkedArray | pa.Array,
                     known_in: str, log: ProblemLog) -> pa.Table:
    """Drop rows whose `column` names an id missing from `known` (reporting each)."""
    present = pc.is_in(table[column], value_set=known.combine_chunks() if isinstance(known, pa.ChunkedArray) else known)
    present_np = present.to_numpy(zero_copy_only=False)
    if present_np.all():
        return table
    lines = table["line"].to_numpy()
    for row in np.flatnonzero(~present_np):
        log.report(Problem(str(path), int(lines[row]), field_name,
                           f"unknown id {table[column][int(row)].as_py()!r} (not in {known_in})", "unknown id"))
    return table.filter(present)
