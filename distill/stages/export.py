"""Training files other tools read, written from a candidates file.

- `flagembedding`: FlagEmbedding's fine-tuning JSON Lines, one line per query,
  `{"query", "pos": [text], "neg": [text], "pos_scores", "neg_scores"}` (scores
  only when the candidates carry dense scores).
- `n-tuple` / `n-tuple-scores`: sentence-transformers' n-tuple dataset (the
  `output_format="n-tuple"` of `mine_hard_negatives`), a Hugging Face datasets
  folder (`datasets.load_from_disk`) with columns anchor, positive, negative_1 ..
  negative_n, plus `scores` = [s(q,d+), s(q,d-_1), ...] for n-tuple-scores; one
  row per (query, positive); queries with fewer than n negatives are left out
  and counted, as sentence-transformers does.

Written to a temporary name and renamed when complete, so a killed export
never leaves a half file that looks whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from labelers.errors import UsageError

from ..data import DataError, RetrievalSet
from ..data.records import CandidateRecord, iter_candidates
from ..data.sources import is_hf_dataset_dir
from ..files import write_lines_atomic

EXPORT_BATCH = 4096


def _records(candidates: Path) -> Iterator[CandidateRecord]:
    for record in iter_candidates(candidates):
        if record.positives is None:
            raise DataError(f"{candidates}:{record.line}: field \"positives\": missing; exports need the candidates "
                            "file distill mine writes")
        yield record


def _texts(rset: RetrievalSet, include_title: bool) -> Callable[[list[str]], list[str]]:
    corpus = rset.corpus
    return lambda pids: corpus.passages_at(corpus.rows_of(pids), include_title=include_title) if pids else []


def export_flagembedding(candidates: Path, rset: RetrievalSet, output: Path, include_title: bool = True) -> dict:
    query_text = dict(zip(rset.queries.ids, rset.queries.texts))
    texts = _texts(rset, include_title)

    def lines():
        for record in _records(candidates):
            line = {"query": query_text[record.qid], "pos": texts(list(record.positives)),
                    "neg": texts(list(record.pids))}
            if record.score_kind == "dense" and record.positive_scores is not None:
                line["pos_scores"] = list(record.positive_scores)
                line["neg_scores"] = list(record.scores)
            yield json.dumps(line, ensure_ascii=False) + "\n"

    rows = write_lines_atomic(output, lines())
    return {"rows": rows, "skipped": 0}


def _export_n_tuple(candidates: Path, rset: RetrievalSet, output: Path, include_title: bool, scores: bool) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    query_text = dict(zip(rset.queries.ids, rset.queries.texts))
    texts = _texts(rset, include_title)
    n = max((len(r.pids) for r in _records(candidates)), default=0)
    if n == 0:
        raise UsageError(f"{candidates}: no query has negatives; nothing to export")
    columns = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, n + 1)]
    fields = [pa.field(c, pa.string()) for c in columns]
    if scores:
        fields.append(pa.field("scores", pa.list_(pa.float32())))
    schema = pa.schema(fields)
    rows, skipped = 0, 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as work:
        parquet = Path(work) / "rows.parquet"
        with pq.ParquetWriter(parquet, schema) as writer:
            batch: dict[str, list] = {f.name: [] for f in fields}

            def flush() -> None:
                if batch["anchor"]:
                    writer.write_table(pa.table(batch, schema=schema))
                    for values in batch.values():
                        values.clear()

            for record in _records(candidates):
                if len(record.pids) < n:
                    skipped += 1
                    continue
                if scores and record.score_kind != "dense":
                    raise UsageError(f"{candidates}: n-tuple-scores needs dense scores (mine with a --model)")
                negatives = texts(list(record.pids))
                for j, positive in enumerate(texts(list(record.positives))):
                    batch["anchor"].append(query_text[record.qid])
                    batch["positive"].append(positive)
                    for i, negative in enumerate(negatives, start=1):
                        batch[f"negative_{i}"].append(negative)
                    if scores:
                        batch["scores"].append([record.positive_scores[j], *record.scores])
                    rows += 1
                if len(batch["anchor"]) >= EXPORT_BATCH:
                    flush()
            flush()
        staged = Path(work) / "dataset"
        Dataset.from_parquet(str(parquet), cache_dir=str(Path(work) / "cache")).save_to_disk(str(staged))
        if output.exists():
            if output.is_dir() and not is_hf_dataset_dir(output):  # replace an earlier export, nothing else
                raise UsageError(f"--export-output {output}: is a folder that is not a saved dataset; it is left as "
                                 "it is: give a new path")
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(staged, output)
    return {"rows": rows, "skipped": skipped}


EXPORTERS: dict[str, Callable[..., dict]] = {
    "flagembedding": export_flagembedding,
    "n-tuple": lambda c, r, o, include_title=True: _export_n_tuple(c, r, o, include_title, scores=False),
    "n-tuple-scores": lambda c, r, o, include_title=True: _export_n_tuple(c, r, o, include_title, scores=True),
}


def check_export_output(fmt: str, output: Path) -> None:
    """Before any work: the export may replace a file, or (n-tuple formats) an earlier saved dataset, nothing else."""
    output = Path(output)
    if not output.is_dir():
        return
    if fmt == "flagembedding":
        raise UsageError(f"--export-output {output}: is a folder; flagembedding writes one JSON Lines file")
    if not is_hf_dataset_dir(output):
        raise UsageError(f"--export-output {output}: is a folder that is not a saved dataset; it is left as it is: "
                         "give a new path")


def export_candidates(candidates: Path, rset: RetrievalSet, fmt: str, output: Path, include_title: bool = True) -> dict:
    if fmt not in EXPORTERS:
        raise UsageError(f"export format {fmt!r} is not known; choose one of {sorted(EXPORTERS)}")
    return EXPORTERS[fmt](Path(candidates), rset, Path(output), include_title=include_title)
