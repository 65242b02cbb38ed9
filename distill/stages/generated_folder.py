"""The corpus-wide finish of `distill generate`: the filters that need every sample (duplicate questions) or
the retriever (Promptagator's round trip: the source passage in the retriever's top `--round-trip-k`), the BEIR
folder the next stages take as `--data`, and the summary (written last: its presence means the folder is done).

The per-passage sampling that comes before is `generate.QuestionSampler`; this module only reads its records.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from labelers.filters import FILTERS, Pair, apply_filters, copied_warning

from ..data import Corpus
from ..data.records import GeneratedSample, GenerationRecord
from ..encoding import EncodingSettings
from ..files import write_json_atomic, write_lines_atomic
from ..index import build_index, corpus_embeddings, embeddings, query_source, search

if TYPE_CHECKING:
    from .generate import GenerateConfig

logger = logging.getLogger(__name__)
SUMMARY = "generate_summary.json"


def final_settings(cfg: GenerateConfig, passage_settings: dict) -> dict:
    """What the finished folder depends on: the sampling job plus the corpus-wide filters."""
    return {**passage_settings, "shard": None, "filters": list(cfg.filters), "round_trip_k": cfg.round_trip_k,
            "retriever": cfg.retriever if "round_trip" in cfg.filters else None}


def round_trip_ranks(cfg: GenerateConfig, corpus: Corpus, questions: list[str], source_rows: list[int]) -> list[int | None]:
    """Rank of each question's source passage in the retriever's top `round_trip_k` (None when absent)."""
    if not questions:
        return []
    settings = EncodingSettings(batch_size=cfg.batch_size, include_title=cfg.include_title,
                                trust_remote_code=cfg.trust_remote_code)
    encoder = settings.load_encoder(cfg.retriever)
    passages = corpus_embeddings(encoder, corpus, cache_dir=settings.cache_path, include_title=cfg.include_title,
                                 batch_size=cfg.batch_size, show_progress=cfg.show_progress)
    queries = embeddings(encoder, query_source(questions), cache_dir=None, batch_size=cfg.batch_size)
    _, rows = search(build_index(passages), queries, cfg.round_trip_k)
    ranks = []
    for found, source in zip(rows, source_rows):
        hit = np.flatnonzero(found == source)
        ranks.append(int(hit[0]) if len(hit) else None)
    return ranks


@dataclass(frozen=True)
class Candidate:
    """A generated sample on its way through the corpus-wide filters: its query id, passage and sample."""

    id: str
    pid: str
    sample: GeneratedSample


def write_folder(folder: Path, corpus: Corpus, kept: list[Candidate]) -> None:
    """corpus.jsonl (the input's passages), queries.jsonl and qrels/train.tsv."""
    def corpus_lines():
        for batch in corpus.table.select(["id", "title", "text", "doc_id"]).to_batches(max_chunksize=65536):
            for row in batch.to_pylist():
                record = {"_id": row["id"], "title": row["title"] or "", "text": row["text"]}
                if row["doc_id"] is not None:
                    record["doc_id"] = row["doc_id"]
                yield json.dumps(record, ensure_ascii=False) + "\n"

    write_lines_atomic(folder / "corpus.jsonl", corpus_lines())
    write_lines_atomic(folder / "queries.jsonl", (json.dumps(
        {"_id": q.id, "text": q.sample.question, "answers": [q.sample.answer], "positives": [q.pid],
         "support": q.sample.support}, ensure_ascii=False) + "\n" for q in kept))
    (folder / "qrels").mkdir(exist_ok=True)
    write_lines_atomic(folder / "qrels" / "train.tsv",
                       ["query-id\tcorpus-id\tscore\n"] + [f"{q.id}\t{q.pid}\t1\n" for q in kept])


def finish(cfg: GenerateConfig, corpus: Corpus, records: list[GenerationRecord], settings: dict,
           seconds: float) -> dict:
    """Corpus-wide filters, the BEIR folder and the summary (written last: its presence means done)."""
    folder = Path(cfg.output)
    samples, counts = [], {name: 0 for name in cfg.filters}
    for record in records:
        for k, s in enumerate(record.samples):
            samples.append(Candidate(f"gen-{record.pid}-{k}", record.pid, s))
            if s.rejected:
                counts[s.rejected] += 1
    reasons = [c.sample.rejected for c in samples]
    pairs = [Pair(c.sample.question, c.sample.answer, "", c.sample.support) for c in samples]
    filter_settings = cfg.filter_settings([])  # duplicate and round_trip do not look at the examples
    if "duplicate" in cfg.filters:
        reasons, found = apply_filters(pairs, ["duplicate"], filter_settings, reasons)
        counts.update(found)
    if "round_trip" in cfg.filters:
        alive = [i for i, r in enumerate(reasons) if r is None]
        rows = corpus.rows_of([samples[i].pid for i in alive])
        for i, rank in zip(alive, round_trip_ranks(cfg, corpus, [samples[i].sample.question for i in alive],
                                                   list(rows))):
            pairs[i].rank = rank
        reasons, found = apply_filters(pairs, ["round_trip"], filter_settings, reasons)
        counts.update(found)
    kept = [s for s, r in zip(samples, reasons) if r is None]
    write_folder(folder, corpus, kept)
    completed = {"answered": sum(c.sample.completed for c in samples), "kept": sum(c.sample.completed for c in kept)}
    summary = {"passages": len(records), "generated": len(samples), "removed": counts, "kept": len(kept),
               "completed_answers": completed, "seconds": round(seconds, 1), "settings": settings, "complete": True,
               "examples": [{"question": q.sample.question, "answer": q.sample.answer, "pid": q.pid} for q in kept[:3]]}
    write_json_atomic(folder / SUMMARY, summary)
    return summary


def print_summary(summary: dict, folder: Path) -> None:
    print(f"generate: {summary['passages']} passages, {summary['generated']} samples -> {summary['kept']} kept "
          f"({summary['kept'] / max(summary['generated'], 1):.0%}) in {summary['seconds']:.0f} s")
    for name in FILTERS:  # in the order they ran
        if name in summary["removed"]:
            print(f"  {name:<12} removed {summary['removed'][name]}")
    completed = summary.get("completed_answers")
    if completed and completed["answered"]:
        print(f"  {completed['answered']} question-only samples answered by the greedy pass, {completed['kept']} kept")
    for example in summary["examples"]:
        print(f"  e.g. Q: {example['question']}  A: {example['answer']}")
    if warning := copied_warning(summary["removed"], summary["generated"]):
        logger.warning(warning)
    print(f"-> {folder} (corpus.jsonl, queries.jsonl, qrels/train.tsv)")


def is_generated(folder: Path, settings: dict | None = None) -> bool:
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return False
    summary = json.loads(path.read_text(encoding="utf-8"))
    return bool(summary.get("complete")) and (settings is None or summary.get("settings") == json.loads(
        json.dumps(settings, sort_keys=True, default=str)))
