"""`distill eval`: dense retrieval quality of an encoder on a BEIR-style set.

Encodes the split's queries and the corpus (cached on disk), searches a faiss
index for each query's top-k, and reports nDCG@10, MRR@10, Recall@1/5/10/100
and MAP@100 (see `metrics`), as a table and as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import add_command
from .data import RetrievalSet, load_retrieval_set
from .encoding import EncodingSettings
from .index import IndexConfig, build_index, corpus_embeddings, embeddings, query_source, search
from .metrics import DEFAULT_CUTOFFS, mean_metrics
from .model import BiEncoder

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvalConfig(EncodingSettings):
    model: str = field(metadata={"help": "encoder: our folder, a sentence-transformers folder or a HF name/path"})
    data: str = field(metadata={"help": "BEIR-style folder (corpus, queries, qrels/<split>.tsv) or an embedded set name"})
    split: str = field(default="test", metadata={"help": "qrels split to evaluate"})
    output: Path | None = field(default=None, metadata={"help": "write the metrics here as JSON"})
    top_k: int = field(default=100, metadata={"help": "passages retrieved per query"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip and count invalid records instead of stopping"})
    show_progress: bool = field(default=True, metadata={"help": "progress bars"})


def retrieve(encoder: BiEncoder, rset: RetrievalSet, *, top_k: int = 100, batch_size: int = 64,
             include_title: bool = True, cache_dir: Path | None = None, index: IndexConfig | None = None,
             show_progress: bool = False) -> dict[str, list[tuple[str, float]]]:
    """Each split query's top-k passages as [(passage_id, score)], best first."""
    passages = corpus_embeddings(encoder, rset.corpus, cache_dir=cache_dir, include_title=include_title,
                                 batch_size=batch_size, show_progress=show_progress)
    queries = embeddings(encoder, query_source(rset.queries.texts), cache_dir=cache_dir, batch_size=batch_size,
                         show_progress=show_progress)
    scores, rows = search(build_index(passages, index), queries, top_k)
    ids = rset.corpus.ids_at(rows.clip(min=0).ravel())
    width = rows.shape[1]
    return {qid: [(ids[i * width + j], float(scores[i, j])) for j in range(width) if rows[i, j] >= 0]
            for i, qid in enumerate(rset.queries.ids)}


def rankings_from_hits(hits: dict[str, list[tuple[str, float]]]) -> dict[str, list[str]]:
    """Passage ids per query by descending score, ties by ascending id (as sentence-transformers)."""
    return {qid: [pid for pid, _ in sorted(h, key=lambda x: (-x[1], x[0]))] for qid, h in hits.items()}


def evaluate(encoder: BiEncoder, rset: RetrievalSet, **retrieve_options) -> dict[str, float]:
    hits = retrieve(encoder, rset, **retrieve_options)
    return mean_metrics(rankings_from_hits(hits), rset.qrels, DEFAULT_CUTOFFS)


def model_label(model: str) -> str:
    """A short name for tables: the last two parts of a path, or the hub name."""
    parts = Path(model).parts
    return "/".join(parts[-2:]) if parts else model


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows of metrics (fractions) as a fixed-width table of percentages."""
    names = [f"{m}@{k}" for m, k in DEFAULT_CUTOFFS]
    label_width = max(len("model"), *(len(r) for r in rows))
    lines = ["model".ljust(label_width) + "".join(n.rjust(11) for n in names)]
    for label, metrics in rows.items():
        lines.append(label.ljust(label_width) + "".join(f"{100 * metrics[n]:11.2f}" for n in names))
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "eval", EvalConfig, run, help="retrieval metrics of an encoder on a BEIR-style set",
                description=__doc__)


def run(cfg: EvalConfig) -> int:
    rset = load_retrieval_set(cfg.data, cfg.split, skip_invalid=cfg.skip_invalid)
    if cfg.skip_invalid:
        print(rset.problems.summary())
    started = time.perf_counter()
    encoder = cfg.load_encoder(cfg.model)
    metrics = evaluate(encoder, rset, top_k=cfg.top_k, batch_size=cfg.batch_size, include_title=cfg.include_title,
                       cache_dir=cfg.cache_path, index=cfg.index_config(),
                       show_progress=cfg.show_progress)
    seconds = time.perf_counter() - started
    print(f"{len(rset.queries)} {cfg.split} queries, {len(rset.corpus)} passages, {seconds:.1f} s")
    print(format_table({model_label(cfg.model): metrics}))
    if cfg.output:
        report = {**metrics, "num_queries": len(rset.queries), "num_passages": len(rset.corpus),
                  "skipped_records": rset.problems.total, "seconds": round(seconds, 3),
                  "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"metrics written to {cfg.output}")
    return 0
