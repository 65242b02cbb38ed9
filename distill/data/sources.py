"""Raw record sources: JSON Lines, Parquet, Hugging Face datasets, TSV qrels.

Each source yields `(line, record)` pairs, where `line` is the 1-based line
(JSON Lines, TSV) or row (Parquet, datasets) and `record` is a dict, or a
`Problem` when the line cannot be parsed at all. Records are produced one at a
time so that callers can build columnar tables in bounded chunks.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from labelers.errors import UsageError

from .errors import Problem

Record = tuple[int, "dict | Problem"]
TABULAR_BATCH_ROWS = 8192


UTF8_BOM = b"\xef\xbb\xbf"


def _decoded_lines(path: Path) -> Iterator[tuple[int, "str | Problem"]]:
    """Each line as text, or a Problem naming the first byte that is not UTF-8. A byte-order mark at the
    start of the file is dropped (read as "utf-8-sig", what json's "Unexpected UTF-8 BOM" error asks for):
    editors on Windows write one, and it would otherwise glue itself to the first id or header."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, Problem(str(path), line_no, None,
                                       f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                                       "not UTF-8")


def iter_text_lines(path: Path) -> Iterator[tuple[int, "str | Problem"]]:
    """Each line of a text file (TREC runs, plain lists), decoded as `_decoded_lines` does."""
    return _decoded_lines(path)


def iter_jsonl(path: Path) -> Iterator[Record]:
    """Lines of a JSON Lines file; blank lines are ignored."""
    for line_no, line in _decoded_lines(path):
        if isinstance(line, Problem):
            yield line_no, line
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_no, Problem(str(path), line_no, None,
                                   f"malformed JSON: {exc.msg} (column {exc.colno})", "malformed JSON")
            continue
        if not isinstance(record, dict):
            yield line_no, Problem(str(path), line_no, None,
                                   f"expected a JSON object, got {type(record).__name__}", "not an object")
            continue
        yield line_no, record


def iter_parquet(path: Path) -> Iterator[Record]:
    """Rows of a Parquet file, read a batch at a time."""
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=TABULAR_BATCH_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def iter_hf_dataset(path: Path) -> Iterator[Record]:
    """Rows of a Hugging Face dataset saved with `save_to_disk`."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise UsageError(f"{path}: is a DatasetDict with splits {list(dataset)}; point to one split's folder")
    row = 0
    for batch in dataset.iter(batch_size=TABULAR_BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            yield row, dict(zip(columns, values))


def iter_qrels_tsv(path: Path) -> Iterator[Record]:
    """Lines of a qrels file: `query-id corpus-id score` (BEIR, header optional)
    or TREC's `query-id 0 corpus-id score`."""
    for line_no, line in _decoded_lines(path):
        if isinstance(line, Problem):
            yield line_no, line
            continue
        line = line.strip()
        if not line:
            continue
        cells = line.split("\t") if "\t" in line else line.split()
        if line_no == 1 and cells[0].lower() in {"query-id", "query_id", "qid"}:
            continue  # header
        if len(cells) == 4:  # TREC qrels: qid iteration docid relevance
            cells = [cells[0], cells[2], cells[3]]
        if len(cells) != 3:
            yield line_no, Problem(str(path), line_no, None,
                                   f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cells)}",
                                   "wrong column count")
            continue
        yield line_no, {"query-id": cells[0], "corpus-id": cells[1], "score": cells[2]}


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists()


# How a file's form is recognised, in the order tried: (test, reader).
SOURCE_READERS: list[tuple[Callable[[Path], bool], Callable[[Path], Iterator[Record]]]] = [
    (is_hf_dataset_dir, iter_hf_dataset),
    (lambda p: p.suffix == ".parquet", iter_parquet),
    (lambda p: p.suffix in {".tsv", ".txt", ".trec"}, iter_qrels_tsv),
    (lambda p: p.suffix in {".jsonl", ".json", ".ndjson"}, iter_jsonl),
]


def iter_records(path: Path) -> Iterator[Record]:
    """Records of any supported file form."""
    for matches, reader in SOURCE_READERS:
        if matches(path):
            return reader(path)
    raise UsageError(f"{path}: unsupported file form (use .jsonl, .parquet, .tsv or a saved datasets folder)")
