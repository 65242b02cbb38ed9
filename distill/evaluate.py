"""`distill eval`: dense retrieval quality of an encoder on a BEIR-style set.

Encodes the split's queries and the corpus (cached on disk), searches a faiss
index for each query's top-k, and reports nDCG@10, MRR@10, Recall@1/5/10/100
and MAP@100 (see `metrics`), as a table and as JSON. `--run-file` also writes
the rankings as a TREC run (`qid Q0 pid rank score tag`, what trec_eval, ranx
and pytrec_eval read); `--baseline-run` compares this model's per-query
nDCG@10 with another run's on the same queries (bootstrap interval and
randomization test, `metrics.compare_paired`).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from labelers.errors import UsageError

from .config import add_command
from .data import DataError, RetrievalSet, load_retrieval_set
from .data.records import ranked, read_trec_run
from .encoding import EncodingSettings
from .files import write_lines_atomic, write_text_atomic
from .index import IndexConfig, build_index, corpus_embeddings, embeddings, query_source, search
from .metrics import DEFAULT_CUTOFFS, PairedComparison, compare_paired, mean_metrics, per_query_metrics
from .model import BiEncoder

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvalConfig(EncodingSettings):
    model: str = field(metadata={"help": "encoder: our folder, a sentence-transformers folder or a HF name/path"})
    data: str = field(metadata={"help": "BEIR-style folder (corpus, queries, qrels/<split>.tsv) or an embedded set name"})
    split: str = field(default="test", metadata={"help": "qrels split to evaluate"})
    output: Path | None = field(default=None, metadata={"help": "write the metrics here as JSON"})
    top_k: int = field(default=100, metadata={"help": "passages retrieved per query"})
    run_file: Path | None = field(default=None, metadata={
        "help": "also write the rankings here as a TREC run file (qid Q0 pid rank score tag)"})
    baseline_run: Path | None = field(default=None, metadata={
        "help": "TREC run of another model on the same split: report this model's paired nDCG@10 gain over it"})
    seed: int = field(default=0, metadata={"help": "seed of --baseline-run's bootstrap and randomization test"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip and count invalid records instead of stopping"})
    show_progress: bool = field(default=True, metadata={"volatile": True, "help": "progress bars"})


    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UsageError(f"--top-k must be >= 1, got {self.top_k}")


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


def evaluate(encoder: BiEncoder, rset: RetrievalSet, **retrieve_options) -> dict[str, float]:
    hits = retrieve(encoder, rset, **retrieve_options)
    return mean_metrics(ranked(hits), rset.qrels, DEFAULT_CUTOFFS)


def write_trec_run(path: Path, hits: dict[str, list[tuple[str, float]]], tag: str) -> None:
    """Rankings as TREC run lines `qid Q0 pid rank score tag`, ranks from 1 in our metrics' order.

    Written whole or not at all. Ids with whitespace cannot be written in this format.
    """
    tag = "".join(tag.split()) or "distill"

    def lines():
        for qid, ranking in hits.items():
            for rank, (pid, score) in enumerate(sorted(ranking, key=lambda x: (-x[1], x[0])), 1):
                if len(qid.split()) != 1 or len(pid.split()) != 1:
                    raise DataError(f"{path}: query {qid!r} or passage {pid!r} has whitespace, which a TREC run "
                                    "cannot hold")
                yield f"{qid} Q0 {pid} {rank} {score:.6f} {tag}\n"

    write_lines_atomic(path, lines())


def compare_to_run(rankings: dict[str, list[str]], baseline: dict[str, list[str]], qrels, *, seed: int = 0,
                   metric: str = "ndcg@10") -> PairedComparison:
    """Paired comparison of `metric`, these rankings against the baseline's, over the qrels queries that both
    rank: a query the baseline does not rank is left out of the pairs, never scored 0 for it (that would credit
    this model with the baseline's gaps)."""
    name, k = metric.split("@")
    queries = [q for q in qrels if q in baseline and q in rankings]
    judged = {q: qrels[q] for q in queries}
    ours = per_query_metrics(rankings, judged, [(name, int(k))])[metric]
    theirs = per_query_metrics(baseline, judged, [(name, int(k))])[metric]
    return compare_paired([theirs[q] for q in queries], [ours[q] for q in queries], np.random.default_rng(seed))


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


def check_output_path(path: Path | None, flag: str) -> None:
    """Fail before any work when an output cannot be written as a file there."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file path (e.g. {path / 'metrics.json'})")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")


def check_trec_ids(rset: RetrievalSet, path: Path) -> None:
    """A TREC run is whitespace-separated: refuse ids it cannot hold before encoding anything."""
    import pyarrow.compute as pc

    for ids, kind in ((rset.queries.table["id"], "query"), (rset.corpus.table["id"], "passage")):
        spaced = pc.match_substring_regex(ids, r"\s")
        if pc.any(spaced).as_py():
            bad = ids.filter(spaced)[0].as_py()
            raise DataError(f"--run-file {path}: {kind} id {bad!r} holds whitespace, which a TREC run cannot hold")


def run(cfg: EvalConfig) -> int:
    check_output_path(cfg.output, "--output")
    check_output_path(cfg.run_file, "--run-file")
    rset = load_retrieval_set(cfg.data, cfg.split, skip_invalid=cfg.skip_invalid)
    if cfg.run_file:
        check_trec_ids(rset, cfg.run_file)
    if cfg.skip_invalid:
        print(rset.problems.summary())
    started = time.perf_counter()
    baseline = read_trec_run(cfg.baseline_run).rankings() if cfg.baseline_run else None  # bad file: fail before encoding
    if baseline is not None:
        missing = sum(q not in baseline for q in rset.qrels)
        if missing == len(rset.qrels):
            raise DataError(f"{cfg.baseline_run}: ranks none of the {cfg.split} split's queries (another split?)")
        if missing:
            logger.warning("%s: no ranking for %d of %d queries; the paired comparison is over the %d it ranks",
                           cfg.baseline_run, missing, len(rset.qrels), len(rset.qrels) - missing)
            print(f"WARNING: {cfg.baseline_run} ranks {len(rset.qrels) - missing} of the {len(rset.qrels)} "
                  f"{cfg.split} queries: the paired comparison is over those {len(rset.qrels) - missing} only")
    encoder = cfg.load_encoder(cfg.model)
    hits = retrieve(encoder, rset, top_k=cfg.top_k, batch_size=cfg.batch_size, include_title=cfg.include_title,
                    cache_dir=cfg.cache_path, index=cfg.index_config(), show_progress=cfg.show_progress)
    rankings = ranked(hits)
    metrics = mean_metrics(rankings, rset.qrels, DEFAULT_CUTOFFS)
    seconds = time.perf_counter() - started
    print(f"{len(rset.queries)} {cfg.split} queries, {len(rset.corpus)} passages, {seconds:.1f} s")
    print(format_table({model_label(cfg.model): metrics}))
    if cfg.run_file:
        write_trec_run(cfg.run_file, hits, model_label(cfg.model).replace("/", "_"))
        print(f"run written to {cfg.run_file}")
    comparison = None
    if baseline is not None:
        comparison = compare_to_run(rankings, baseline, rset.qrels, seed=cfg.seed)
        print(f"nDCG@10 against {cfg.baseline_run}: {comparison.describe()}")
    if cfg.output:
        report = {**metrics, "num_queries": len(rset.queries), "num_passages": len(rset.corpus),
                  "skipped_records": rset.problems.total, "seconds": round(seconds, 3),
                  **({"ndcg@10_vs_baseline": asdict(comparison)} if comparison else {}),
                  "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
        write_text_atomic(Path(cfg.output), json.dumps(report, indent=2) + "\n")  # its presence means done
        print(f"metrics written to {cfg.output}")
    return 0
