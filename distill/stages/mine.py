"""`distill mine`: candidate negatives for each query, for the teacher to score and the student to train on.

For every query of the split, `--num-negatives` passages chosen by one
strategy of `distill.negatives` (dense top-K with rank window and margins,
SimANS, BM25, hybrid, same-article, random), never a positive, never the
query's own text, and, with `--labels`, never a passage the teacher rewards at
least as highly as a positive. Output: candidates JSON Lines

    {"qid", "pids", "scores", "score_kind", "source", "positives", "positive_scores"}

(`scores` are the dense model's s(q, d) when a model is given, else BM25's or
null), which `distill label --candidates` reads; optionally also training
files in FlagEmbedding's format and as sentence-transformers n-tuple datasets.

Corpus and query embeddings live in the on-disk cache (memory-mapped); faiss
is searched one chunk of queries at a time, so memory follows the chunk, not
the query count. Resumable and sharded through `stages.writer`: rerun after a
kill and the file is byte-identical to an uninterrupted run's. Every random
choice is seeded by (seed, query id), so shards and chunking do not change it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelers.errors import UsageError

from ..config import add_command, output_settings
from ..data import DataError, RetrievalSet, load_retrieval_set
from ..data.records import CandidateRecord, iter_candidates, read_labels
from ..encoding import EncodingSettings
from ..negatives.settings import WindowSettings
from ..files import file_digest
from ..index import build_index, embeddings, passage_source, query_source, search
from ..negatives import STRATEGIES, MiningBatch, Ranked, CandidateWindow, query_rng, teacher_exclusions
from ..negatives.bm25 import TOKENIZERS, BM25Index
from .export import EXPORTERS, check_export_output, export_candidates
from ..supervision import SuppliedData
from .record_settings import RecordStageSettings
from .record_stage import run_record_stage
from .writer import Shard

logger = logging.getLogger(__name__)
DEFAULT_POOL_SIZE = 16  # the retriever's top K per query without qrels, for the teacher to choose from


@dataclass(kw_only=True)
class MineConfig(EncodingSettings, WindowSettings, RecordStageSettings):
    data: str = field(metadata={"help": "BEIR-style folder (corpus, queries, qrels/<split>.tsv) or an embedded set name"})
    output: Path = field(metadata={"help": "candidates JSON Lines to write"})
    model: str | None = field(default=None, metadata={
        "help": "dense encoder (our folder, a sentence-transformers folder or a HF name); needed by dense, simans, "
                "hybrid and by score filters; optional for bm25, random, same_doc (then scores are BM25's or null)"})
    split: str = field(default="train", metadata={"help": "qrels split whose queries get negatives"})
    strategy: str = field(default="dense", metadata={"help": "how negatives are chosen", "choices": sorted(STRATEGIES)})
    num_negatives: int = field(default=7, metadata={"help": "negatives per query, beyond its positives"})
    pool_size: int | None = field(default=None, metadata={
        "help": "queries without qrels: candidates per query, the retriever's top K (default: 16); nothing is "
                "removed as a positive"})
    absolute_margin: float | None = field(default=None, metadata={"help": "drop d if s(q,d) + m > s(q,d+)"})
    relative_margin: float | None = field(default=None,
                                          metadata={"help": "drop d if s(q,d) > s(q,d+) - |s(q,d+)|*m (NV-Retriever: 0.05)"})
    max_score: float | None = field(default=None, metadata={"help": "drop d if s(q,d) > this"})
    min_score: float | None = field(default=None, metadata={"help": "drop d if s(q,d) < this"})
    sampling: str = field(default="top", metadata={"help": "dense/bm25/hybrid: the window's top N or N at random",
                                                   "choices": ["top", "random"]})
    bm25_tokenizer: str = field(default="ngram", metadata={"help": "BM25 text splitting (ngram: words + CJK char "
                                                                  "uni/bigrams)", "choices": list(TOKENIZERS)})
    bm25_k1: float = field(default=1.5, metadata={"help": "BM25 k1"})
    bm25_b: float = field(default=0.75, metadata={"help": "BM25 b"})
    labels: Path | None = field(default=None, metadata={
        "help": "teacher labels (distill label): never use a passage rewarded >= a positive as a negative"})
    chunk_size: int = field(default=1024, metadata={"help": "queries per search chunk and fsync'd output chunk"})
    export: str | None = field(default=None, metadata={"help": "also write a training file in this format",
                                                       "choices": sorted(EXPORTERS)})
    export_output: Path | None = field(default=None, metadata={
        "help": "where --export writes (JSONL for flagembedding, a datasets folder for n-tuple*)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_negatives < 1:
            raise UsageError(f"--num-negatives must be >= 1, got {self.num_negatives}")
        if self.pool_size is not None and self.pool_size < 1:
            raise UsageError(f"--pool-size must be >= 1 (the candidates the teacher chooses among), got "
                             f"{self.pool_size}")
        if self.export and not self.export_output:
            raise UsageError("--export needs --export-output")
        window = self.candidate_window()  # the rank window and the margins are in range
        pools = STRATEGIES[self.strategy].POOLS
        if self.model is None and ("dense" in pools or window.filters_scores):
            raise UsageError(f"--strategy {self.strategy}" + (" with score filters" if "dense" not in pools else "")
                             + " needs a dense --model")

    def check_against(self, data: SuppliedData) -> None:
        if data.labelled and self.pool_size is not None:
            raise UsageError(f"--pool-size is for queries without qrels; {data.where} has qrels: use --num-negatives")
        window = self.candidate_window()
        if not data.labelled and (self.strategy in NEEDS_POSITIVES or window.absolute_margin is not None
                                  or window.relative_margin is not None):
            raise UsageError(f"{data.where} has no qrels, so no positive to measure from: --strategy {self.strategy} "
                             "and the margin filters need one; use dense, bm25 or hybrid to take the retriever's top "
                             "--pool-size")
        if self.export and not data.labelled:
            raise UsageError(f"--export writes (query, positive, negatives) rows; {data.where} has no qrels")

    def candidate_window(self) -> CandidateWindow:
        return super().candidate_window(absolute_margin=self.absolute_margin, relative_margin=self.relative_margin,
                                        max_score=self.max_score, min_score=self.min_score, sampling=self.sampling)


def _rows_by_doc(rset: RetrievalSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(article code per row, rows sorted by code, start of each code's run) for same-article lookups.

    The article is the passage's `doc_id`; when no passage has one, its title
    (BEIR sets such as SQuAD's name the article in the title)."""
    doc_ids = rset.corpus.table["doc_id"]
    if doc_ids.null_count == len(doc_ids):
        doc_ids = rset.corpus.table["title"]
        if doc_ids.null_count == len(doc_ids):
            raise DataError(f"{rset.corpus.path}: the same_doc strategy needs a 'doc_id' (or 'title') on passages")
        logger.info("same_doc: no passage has a doc_id; grouping passages by title")
    codes = pc.fill_null(doc_ids, "").combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False)
    codes = np.where(pc.is_null(doc_ids).to_numpy(zero_copy_only=False), -1, codes).astype(np.int64)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 2))
    return codes, order, starts


class Miner:
    """The mine stage (a `RecordStage`): a slice of the job's queries into candidate records, deterministic in
    the slice. Embeddings, the faiss index and BM25 are built in `start()`, only when there is work."""

    unit = "query"

    def __init__(self, cfg: MineConfig, rset: RetrievalSet, shard: Shard, encoder=None):
        cfg.check_against(SuppliedData.of(rset))
        self.cfg, self.rset, self.shard = cfg, rset, shard
        self.num = pool_size(cfg, rset)
        bounds = shard.bounds(len(rset.queries))
        self.desc = f"mine {cfg.strategy}"
        self.offset = bounds[0]
        qids = self.qids = rset.queries.ids[bounds[0]:bounds[1]]
        self.params = cfg.candidate_window()
        self.strategy = STRATEGIES[cfg.strategy]
        corpus = rset.corpus
        by_id = dict(zip(rset.queries.ids, rset.queries.texts))
        self.texts = [by_id[q] for q in qids]
        self.positive_ids = [rset.positives(q) for q in qids]
        self.positive_rows = corpus.rows_of_each(self.positive_ids)
        own = pc.fill_null(pc.index_in(pa.array(self.texts, pa.string()), value_set=corpus.table["text"].combine_chunks()),
                           -1).to_numpy(zero_copy_only=False).astype(np.int64)
        teacher = teacher_exclusions(read_labels(cfg.labels)) if cfg.labels else {}
        teacher_rows = corpus.rows_of_each([teacher.get(q, []) for q in qids])
        self.excluded = [np.unique(np.concatenate([pos, own[i:i + 1], teacher_rows[i]]))
                         for i, pos in enumerate(self.positive_rows)]
        self.excluded = [e[e >= 0] for e in self.excluded]  # -1: no passage is the query's text / unknown id
        # the same search depth for every chunk and shard: the window plus the most rows any query excludes
        most_excluded = max((len(rset.positives(q)) + 1 + len(teacher.get(q, ())) for q in rset.qrels), default=1)
        self.depth = self.params.range_max + most_excluded

        self.encoder = encoder
        self.passages = self.queries = self.index = None
        self.bm25 = self.docs = None

    @property
    def n_units(self) -> int:
        return len(self.qids)

    def settings(self) -> dict:
        """What the output depends on; resuming with anything else changed is refused."""
        cfg, encoder = self.cfg, self.encoder
        settings = output_settings(cfg, exclude=("data", "output", "labels", "shard", "export", "export_output"))
        settings.update(shard=str(self.shard), data=self.rset.fingerprint(),
                        labels=file_digest(cfg.labels) if cfg.labels else None)
        if encoder is not None:
            settings["encoder"] = hashlib.sha256(json.dumps(
                [encoder.weights_fingerprint(), dataclasses.asdict(encoder.config)], sort_keys=True,
                default=str).encode()).hexdigest()[:24]
        return settings

    def postfix(self, seconds: float) -> str:
        return ""  # the bar's own queries/s says it all

    def close(self) -> None:
        pass

    def prepare(self) -> None:
        """Before Ray actors start: embed once into the (shared) cache, which every actor then reads."""
        if self.encoder is not None and self.cfg.cache_path is not None:
            self.start()

    def start(self) -> None:
        cfg, encoder, corpus, rset = self.cfg, self.encoder, self.rset.corpus, self.rset
        pools = set(self.strategy.POOLS)
        if encoder is not None:
            cache = cfg.cache_path
            self.passages = embeddings(encoder, passage_source(corpus, cfg.include_title), cache_dir=cache,
                                       batch_size=cfg.batch_size, show_progress=cfg.show_progress)
            # every shard embeds all the split's queries (cached, shared): the same floats whatever the shard
            self.queries = embeddings(encoder, query_source(rset.queries.texts), cache_dir=cache,
                                      batch_size=cfg.batch_size, show_progress=cfg.show_progress)
            if "dense" in pools:
                self.index = build_index(self.passages, cfg.index_config())
        if "bm25" in pools:
            self.bm25 = BM25Index(corpus.iter_passages(include_title=cfg.include_title), cfg.bm25_tokenizer,
                                  cfg.bm25_k1, cfg.bm25_b)
        self.docs = _rows_by_doc(rset) if "same_doc" in pools else None

    def _scores(self, start: int, b: int, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.empty(0, dtype=np.float32)
        order = np.argsort(rows)
        vectors = np.empty((len(rows), self.passages.shape[1]), dtype=np.float32)
        vectors[order] = self.passages[rows[order]]  # sorted reads from the memory map
        return vectors @ np.asarray(self.queries[self.offset + start + b], dtype=np.float32)

    def _rescored(self, rows: np.ndarray, batch: MiningBatch) -> Ranked:
        """faiss's pool re-scored one query at a time and sorted by (-score, row).

        faiss's floats (and so near-tie order) depend on how many queries share
        a search call; re-scoring makes every chunk and shard agree exactly."""
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        for b in range(len(rows)):
            valid = rows[b] >= 0
            scores[b, valid] = batch.score_rows(b, rows[b, valid])
            order = np.lexsort((rows[b], -scores[b]))
            rows[b], scores[b] = rows[b, order], scores[b, order]
        rows[~np.isfinite(scores)] = -1
        return Ranked(rows, scores)

    def _same_doc(self, i: int) -> np.ndarray:
        codes, order, starts = self.docs
        found = [order[starts[c]:starts[c + 1]] for c in np.unique(codes[self.positive_rows[i]]) if c >= 0]
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def batch(self, start: int, stop: int) -> MiningBatch:
        n = stop - start
        batch = MiningBatch(qids=self.qids[start:stop], excluded=self.excluded[start:stop],
                            rngs=[query_rng(self.cfg.seed, q) for q in self.qids[start:stop]],
                            corpus_size=len(self.rset.corpus))
        if self.encoder is not None:
            batch.score_rows = lambda b, rows: self._scores(start, b, rows)
            if self.rset.labelled:
                batch.positive_scores = np.array([batch.score_rows(b, self.positive_rows[start + b]).min()
                                                  for b in range(n)], dtype=np.float32)
        if self.index is not None:
            queries = np.asarray(self.queries[self.offset + start:self.offset + stop], dtype=np.float32)
            batch.dense = self._rescored(search(self.index, queries, self.depth)[1], batch)
        if self.bm25 is not None:
            batch.bm25 = self.bm25.search(self.texts[start:stop], self.depth)
        if self.docs is not None:
            batch.same_doc = [self._same_doc(i) for i in range(start, stop)]
        return batch

    def process(self, start: int, stop: int) -> list[dict]:
        batch = self.batch(start, stop)
        chosen = self.strategy.select(batch, self.num, self.params)
        ids = self.rset.corpus.ids_at
        kind = "dense" if self.encoder is not None else ("bm25" if self.cfg.strategy == "bm25" else None)
        records = []
        for b, c in enumerate(chosen):
            positive_scores = (None if self.encoder is None or not self.rset.labelled else
                               tuple(round(float(s), 6) for s in batch.score_rows(b, self.positive_rows[start + b])))
            records.append(CandidateRecord(
                batch.qids[b], tuple(ids(c.rows)) if len(c.rows) else (),
                scores=None if c.scores is None else tuple(round(float(s), 6) for s in c.scores),
                score_kind=kind if c.scores is not None else None, source=self.cfg.strategy,
                sources=tuple(c.sources) if self.cfg.strategy == "hybrid" else None,
                positives=tuple(self.positive_ids[start + b]), positive_scores=positive_scores).to_json())
        return records


NEEDS_POSITIVES = ("simans", "same_doc")  # SimANS centres on s(q, d+); same_doc looks up the positive's article


def pool_size(cfg: MineConfig, rset: RetrievalSet) -> int:
    """Candidates per query: --num-negatives beyond the positives, or for queries without qrels --pool-size (16)."""
    if rset.labelled:
        return cfg.num_negatives
    return cfg.pool_size if cfg.pool_size is not None else DEFAULT_POOL_SIZE


def summarize(output: Path, num_negatives: int) -> dict:
    """Counts and mean scores over a finished candidates file."""
    n, negatives, short, pos, neg = 0, 0, 0, [], []
    for record in iter_candidates(output):
        n += 1
        negatives += len(record.pids)
        short += len(record.pids) < num_negatives
        if record.scores is not None and record.score_kind == "dense":
            neg.extend(record.scores)
        if record.positive_scores:
            pos.extend(record.positive_scores)
    return {"queries": n, "negatives": negatives, "mean_positive_score": float(np.mean(pos)) if pos else None,
            "mean_negative_score": float(np.mean(neg)) if neg else None, "short": short}


def miner_for(cfg: MineConfig) -> Miner:
    """The mine stage for `cfg`: its split read and checked, its encoder loaded (also what each Ray actor builds)."""
    rset = load_retrieval_set(cfg.data, cfg.split, skip_invalid=cfg.skip_invalid, unlabelled=True)
    encoder = cfg.load_encoder(cfg.model) if cfg.model else None
    return Miner(cfg, rset, Shard.parse(cfg.shard), encoder)


def run_mine(cfg: MineConfig) -> dict:
    if cfg.export:
        check_export_output(cfg.export, cfg.export_output)
    started = time.perf_counter()
    miner = miner_for(cfg)
    rset = miner.rset
    num, shard = miner.num, miner.shard
    output = Path(cfg.output)
    run = run_record_stage(miner, output, chunk_size=cfg.chunk_size, overwrite=cfg.overwrite,
                           show_progress=cfg.show_progress, executor=cfg, factory=functools.partial(miner_for, cfg))
    qids, resumed_from = miner.qids, run.job.resumed_from
    stats = summarize(output, num)
    elapsed = time.perf_counter() - started
    print(f"mined {stats['negatives']} {cfg.strategy} {'negatives' if rset.labelled else 'candidates'} for {stats['queries']} {cfg.split} queries in "
          f"{elapsed:.1f} s" + (f", resumed after {resumed_from}" if 0 < resumed_from < len(qids) else "")
          + f" -> {output}")
    if stats["mean_positive_score"] is not None and stats["mean_negative_score"] is not None:
        print(f"mean s(q, d+) {stats['mean_positive_score']:.4f}, mean s(q, d-) {stats['mean_negative_score']:.4f}")
    if stats["short"]:
        print(f"{stats['short']} queries got fewer than {num} candidates (too few candidates survive "
              "the window and filters; widen --range-max or relax the margins)")
    report = {"output": str(output), **stats, "seconds": round(elapsed, 2), "shard": str(shard)}
    if cfg.export:
        report["export"] = export_candidates(output, rset, cfg.export, Path(cfg.export_output),
                                             include_title=cfg.include_title)
        print(f"{cfg.export}: {report['export']['rows']} rows -> {cfg.export_output}"
              + (f" ({report['export']['skipped']} queries with fewer than {cfg.num_negatives} negatives left out)"
                 if report["export"].get("skipped") else ""))
    if rset.problems.total:
        print(rset.problems.summary())
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "mine", MineConfig, run_mine,
                help="candidate negatives per query (dense, SimANS, BM25, random...)",
                description=__doc__.split("\n\n")[0])
