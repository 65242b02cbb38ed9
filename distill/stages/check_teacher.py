"""`distill check-teacher`: before hours of labelling, does this teacher beat this retriever on this data, and
what will the whole label stage cost?

It scores whole chunks of the label job, drawn at random, until they hold `--num-queries` (50) queries whose
positive is known, exactly as `distill label` would (the same `Labeler`, settings, prompts and chunks, written
resumably to `--output`), and prints:

- how often the teacher's reward puts the known positive first, against how often the retriever's score does,
  each with its Wilson 95% interval, and the exact McNemar test of the queries on which they disagree;
- the measured tokens/s and the projected time of the label stage over the whole job on this machine (and in
  GPU-hours at `--reference-tokens-per-s`, when given);
- a one-line verdict.

Known positives come from the split's qrels; else from `--calibration-qrels` (a few labelled queries); else, for
queries with reference answers, from the pools that hold exactly one passage containing an answer (DPR's
distant supervision: a silver label). A query log with none of these cannot be measured; the check then says
so and only projects the cost.

When the teacher does not beat the retriever (its share of positives first is not above the retriever's),
the command exits with status 3 (`WeakTeacher`), unless `--allow-weak-teacher`; `distill run` runs the check
before its label stage, which then reuses the records the check wrote (the same settings and prompts), so no
pool is scored twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelers.errors import UsageError

from ..config import add_command
from ..data import RetrievalSet, load_qrels_for
from ..data.records import LabelRecord, read_candidates, read_labels
from ..files import write_json_atomic
from ..training.positives import contains_answer
from .label import LabelConfig, Labeler, build_labeler
from .record_stage import run_record_stage
from .writer import Shard

EXIT_WEAK_TEACHER = 3


class WeakTeacher(Exception):
    """The teacher does not beat the retriever on the known positives; the message says by how much."""


@dataclass(kw_only=True)
class CheckTeacherConfig(LabelConfig):
    model: str | None = field(default=None, metadata={
        "help": "without --candidates: the retriever (student) whose pools are mined first, as distill mine does, "
                "to <output>.candidates.jsonl"})
    pool_size: int | None = field(default=None, metadata={
        "help": "with --model, for queries without qrels: candidates per query (distill mine's default: 16)"})
    num_queries: int = field(default=50, metadata={
        "help": "score whole chunks of the label job until they hold this many queries with a known positive"})
    calibration_qrels: Path | None = field(default=None, metadata={
        "help": "qrels of a few queries (query-id, corpus-id, score) whose positives are known, for data without "
                "qrels"})
    reference_tokens_per_s: float | None = field(default=None, metadata={
        "volatile": True, "help": "also project the label stage in GPU-hours at this many tokens/s (e.g. a GPU's "
                                  "measured vLLM rate)"})
    allow_weak_teacher: bool = field(default=False, metadata={
        "volatile": True, "help": "exit 0 even when the teacher does not beat the retriever"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_queries < 1:
            raise UsageError(f"--num-queries must be >= 1, got {self.num_queries}")
        if self.reference_tokens_per_s is not None and not self.reference_tokens_per_s > 0:
            raise UsageError(f"--reference-tokens-per-s must be > 0, got {self.reference_tokens_per_s}")
        if not self.candidates and not self.model:
            raise UsageError("check-teacher scores the pools the label stage will score: give --candidates (from "
                             "distill mine) or --model (the retriever, to mine them)")


# ----- the figures: pure functions of the scores -----------------------------------------------------------------

@dataclass(frozen=True)
class Share:
    hits: int
    total: int

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson's score interval (Wilson 1927; what Agresti & Coull 1998 recommend for small n)."""
        if not self.total:
            return float("nan"), float("nan")
        from scipy import stats

        z = stats.norm.ppf(0.5 + confidence / 2)
        n, p = self.total, self.value
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def describe(self) -> str:
        low, high = self.interval()
        return f"{self.hits} of {self.total} ({self.value:.0%}, 95% CI {low:.0%} to {high:.0%})"


def first_is_known(scores: np.ndarray, known: np.ndarray) -> bool:
    """Whether the best score of a known positive beats every other passage's (a tie is not a win)."""
    scores = np.asarray(scores, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    if not known.any() or known.all():
        return bool(known.any())
    return bool(scores[known].max() > scores[~known].max())


@dataclass(frozen=True)
class CheckFigures:
    teacher: Share
    retriever: Share | None       # None: the pools carry no retriever scores
    teacher_only: int             # queries the teacher gets right and the retriever wrong
    retriever_only: int
    mcnemar_p: float | None       # exact two-sided McNemar test over the queries on which they disagree

    @property
    def teacher_beats_retriever(self) -> bool:
        return self.retriever is None or self.teacher.value > self.retriever.value


def check_figures(teacher_scores: list[np.ndarray], retriever_scores: list[np.ndarray | None],
                  known: list[np.ndarray]) -> CheckFigures:
    """How often each signal puts a known positive first, over queries (each a pool: per-passage scores, and a
    mask of its known positives)."""
    from scipy import stats

    teacher = [first_is_known(t, k) for t, k in zip(teacher_scores, known)]
    if any(r is None for r in retriever_scores):
        return CheckFigures(Share(sum(teacher), len(teacher)), None, 0, 0, None)
    retriever = [first_is_known(r, k) for r, k in zip(retriever_scores, known)]
    teacher_only = sum(t and not r for t, r in zip(teacher, retriever))
    retriever_only = sum(r and not t for t, r in zip(teacher, retriever))
    discordant = teacher_only + retriever_only
    p = float(stats.binomtest(teacher_only, discordant, 0.5).pvalue) if discordant else 1.0
    return CheckFigures(Share(sum(teacher), len(teacher)), Share(sum(retriever), len(retriever)), teacher_only,
                        retriever_only, p)


# ----- the check -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownPositives:
    qids: list[str]
    positives: dict[str, set[str]]
    source: str                   # "qrels" | "calibration qrels" | "answer matches"


def known_positives(cfg: CheckTeacherConfig, rset: RetrievalSet, units: list) -> KnownPositives:
    """The units whose positive is known, and where that knowledge comes from."""
    if rset.labelled:
        return KnownPositives([u[0] for u in units], {u[0]: set(rset.positives(u[0])) for u in units}, "qrels")
    if cfg.calibration_qrels:
        qrels = load_qrels_for(cfg.calibration_qrels, rset, cfg.skip_invalid)
        found = {q: {p for p, s in docs.items() if s > 0} for q, docs in qrels.items()}
        return KnownPositives([u[0] for u in units if found.get(u[0])], found, "calibration qrels")
    table = rset.queries.table
    answers = dict(zip(table["id"].to_pylist(), table["answers"].to_pylist()))
    qids, positives = [], {}
    for qid, pids, _ in units:
        if not answers.get(qid):
            continue
        texts = rset.corpus.passages_at(rset.corpus.rows_of(list(pids)), include_title=cfg.include_title)
        matched = [pid for pid, text in zip(pids, texts) if contains_answer(text, answers[qid])]
        if len(matched) == 1:  # exactly one: a silver label; none or several say nothing sure
            qids.append(qid)
            positives[qid] = set(matched)
    return KnownPositives(qids, positives, "answer matches")


def retriever_scores_of(record: LabelRecord, candidates: dict) -> np.ndarray | None:
    """The retriever's score of each passage of a labels line: its own `retriever_scores` (queries without qrels),
    or, with qrels, the mined scores with the positives' (`positive_scores`) in front."""
    if record.retriever_scores is not None:
        return np.asarray(record.retriever_scores)
    mined = candidates.get(record.qid)
    if mined is None or mined.scores is None or mined.positive_scores is None:
        return None
    by_pid = dict(zip(mined.pids, mined.scores)) | dict(zip(mined.positives or (), mined.positive_scores))
    if any(pid not in by_pid for pid in record.pids):
        return None
    return np.array([by_pid[pid] for pid in record.pids])


def check_units(units: list, known: set[str], num_queries: int, chunk_size: int, seed: int) -> list:
    """Whole chunks of the label job, drawn at random (seeded) until they hold `num_queries` queries with a known
    positive (or the job is used up), in job order.

    Whole chunks, so that each is the very slice `distill label` processes: the label stage takes these records as
    they are (`--reuse`), and its output is the bytes it would have written without the check (a batch of other
    rows could move a bf16 reward)."""
    chunks = [units[i:i + chunk_size] for i in range(0, len(units), chunk_size)]
    chosen, found = [], 0
    for index in np.random.default_rng(seed).permutation(len(chunks)):
        if found >= num_queries:
            break
        chosen.append(int(index))
        found += sum(u[0] in known for u in chunks[index])
    return [u for index in sorted(chosen) for u in chunks[index]]  # a short last chunk stays last


def mined_pools(cfg: CheckTeacherConfig) -> Path:
    """`<output>.candidates.jsonl`: the retriever's pools, mined as `distill mine` would (resumable)."""
    from .mine import MineConfig, run_mine

    out = Path(cfg.output).with_name(Path(cfg.output).name + ".candidates.jsonl")
    run_mine(MineConfig(model=cfg.model, data=cfg.data, split=cfg.split, output=out, pool_size=cfg.pool_size,
                        seed=cfg.seed, skip_invalid=cfg.skip_invalid, show_progress=cfg.show_progress))
    return out


def run_check_teacher(cfg: CheckTeacherConfig) -> dict:
    cfg.check_llm()
    if not cfg.show_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if not cfg.candidates:
        cfg = dataclasses.replace(cfg, candidates=mined_pools(cfg))
    full, rset, _ = build_labeler(cfg)
    known = known_positives(cfg, rset, full.units)
    units = check_units(full.units, set(known.qids), cfg.num_queries, cfg.chunk_size, cfg.seed)
    # the label stage's own settings, so that its records are the ones `distill label` writes for these queries
    labeler = Labeler(label_settings(cfg), rset, units, Shard())
    output = Path(cfg.output)
    started = time.perf_counter()
    run = run_record_stage(labeler, output, chunk_size=cfg.chunk_size, overwrite=cfg.overwrite,
                           show_progress=cfg.show_progress)
    seconds = time.perf_counter() - started
    records = read_labels(output)
    candidates = {c.qid: c for c in read_candidates(Path(cfg.candidates), rset)}
    measured = [r for r in records if r.qid in known.positives]
    figures = check_figures([np.asarray(r.rewards) for r in measured],
                            [retriever_scores_of(r, candidates) for r in measured],
                            [np.array([p in known.positives[r.qid] for p in r.pids]) for r in measured])
    # the teacher's tokens (prompts and continuations) this run scored; a finished check keeps its first figures
    earlier = read_check(output) if run.already_complete or labeler.tokens == 0 else None
    done_now = len(records) - run.job.resumed_from
    tokens = labeler.tokens if earlier is None else earlier["tokens"]
    tokens_per_s = (labeler.tokens / seconds if labeler.tokens and seconds > 0 else None) if earlier is None \
        else earlier["tokens_per_s"]
    remaining = len(full.units) - len(records)
    per_query = (tokens / max(done_now, 1)) if earlier is None else earlier["tokens_per_query"]
    summary = {"queries": len(records), "known_from": known.source, "measured": len(measured),
               "teacher_first": figures.teacher.describe() if measured else None,
               "retriever_first": figures.retriever.describe() if measured and figures.retriever else None,
               "teacher_only": figures.teacher_only, "retriever_only": figures.retriever_only,
               "mcnemar_p": figures.mcnemar_p, "tokens": tokens, "tokens_per_s": tokens_per_s,
               "tokens_per_query": per_query,
               "label_queries": len(full.units), "projected_tokens": round(per_query * remaining),
               "projected_seconds": None if not tokens_per_s else round(per_query * remaining / tokens_per_s),
               "teacher_beats_retriever": figures.teacher_beats_retriever if measured else None}
    if cfg.reference_tokens_per_s:
        summary["projected_gpu_hours"] = round(per_query * remaining / cfg.reference_tokens_per_s / 3600, 3)
    summary["verdict"] = verdict(summary, cfg.llm)
    write_json_atomic(summary_path(output), summary)
    print_check(summary)
    if summary["teacher_beats_retriever"] is False and not cfg.allow_weak_teacher:
        raise WeakTeacher(summary["verdict"] + " (--allow-weak-teacher to label anyway)")
    return summary


def label_settings(cfg: CheckTeacherConfig) -> LabelConfig:
    """The check's settings that the label stage has, as a `LabelConfig` (the check's own left out)."""
    return LabelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LabelConfig)})


def summary_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".check.json")


def verdict(summary: dict, teacher: str) -> str:
    if summary["teacher_beats_retriever"] is None:
        return (f"check-teacher: {teacher}'s accuracy cannot be measured here (no qrels, answers or "
                "--calibration-qrels): give a few labelled queries with --calibration-qrels")
    if summary["retriever_first"] is None:
        return f"check-teacher: {teacher} puts the known positive first for {summary['teacher_first']}"
    if summary["teacher_beats_retriever"]:
        return (f"check-teacher: {teacher} beats the retriever ({summary['teacher_first']} against "
                f"{summary['retriever_first']} positives first): labelling should pay")
    return (f"check-teacher: {teacher} does not beat the retriever ({summary['teacher_first']} against "
            f"{summary['retriever_first']} positives first): its labels would teach the student less than its "
            "own ranking; try a larger teacher or another --target")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def print_check(summary: dict) -> None:
    print(f"check-teacher: {summary['queries']} queries scored, {summary['measured']} with a known positive "
          f"(from {summary['known_from']})")
    if summary["teacher_first"]:
        print(f"  teacher puts it first:   {summary['teacher_first']}")
    if summary["retriever_first"]:
        print(f"  retriever puts it first: {summary['retriever_first']}; they disagree on "
              f"{summary['teacher_only'] + summary['retriever_only']} (teacher right on {summary['teacher_only']}, "
              f"McNemar p = {summary['mcnemar_p']:.2g})")
    if summary["tokens_per_s"]:
        line = (f"  {summary['tokens_per_s']:.0f} tokens/s here: the label stage's other "
                f"{summary['label_queries'] - summary['queries']} queries (~{summary['projected_tokens']:,} tokens) "
                f"would take ~{_duration(summary['projected_seconds'])}")
        if summary.get("projected_gpu_hours") is not None:
            line += f", ~{summary['projected_gpu_hours']:.2f} GPU-hours at the reference rate"
        print(line)
    print(summary["verdict"])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "check-teacher", CheckTeacherConfig, run_check_teacher,
                help="before labelling: does the teacher beat the retriever on known positives, and what will "
                     "labelling cost", description=__doc__.split("\n\n")[0])


def read_check(output: Path) -> dict | None:
    """The summary a check wrote beside its labels, if any."""
    path = summary_path(output)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
