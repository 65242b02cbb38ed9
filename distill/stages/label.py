"""`distill label`: the teacher LLM's reward for each query's candidate passages.

For every query of the split, the candidates are its positives (from qrels)
followed by either the passages of its `--candidates` record or, without
that file, `num_random` passages drawn uniformly from the corpus (never a
positive), seeded by (seed, query id) so any shard draws the same ones.
Each candidate gets the reward of `labelers.reward` (mean or sum of the
reference answer's token log-probs, the best over several answers). Queries
without answers fall back to query likelihood (UPR), or have the LLM write an
answer from their first positive passage first (`--missing-answers`).
`--target relevance` scores every query with Gecko's yes/no relevance prompt
instead (log p(Yes) - log p(No); no answers needed).

Output, one line per query (DESIGN.md's labels contract, plus provenance):

    {"qid", "pids", "rewards", "n_tokens", "n_positives", "target", "answer_index"?,
     "answer"?, "signals"?, "model", "prompt", "normalization"}

`target` says what was scored: "answer" (reference answers; `answer_index`
names the one that gave each maximum), "generated_answer" (`answer` holds
the LLM's own), "query" (query likelihood) or "relevance" (n_tokens are the
Yes word's). `--signals relevance query ...` scores further signals in the
same pass over the pool and writes them as `"signals": {name: [...]}`, aligned
with `pids` (a signal equal to the record's target reuses its rewards);
`rewards` stays the training signal. Writing goes through
`stages.writer`: resumable after a kill, byte-identical to an uninterrupted
run, and split with `--shard i/n`.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from labelers.prompts import resolve_template
from labelers.reward import MAX_PASSAGE_TOKENS, RewardGroup, RewardInputs, score_groups
from labelers.errors import UsageError

from ..config import add_command, output_settings
from ..data import DataError, RetrievalSet, load_retrieval_set
from ..data.progress import canonical, verified_progress
from ..data.records import LabelRecord, read_candidates, read_labels
from ..files import file_digest
from ..negatives import query_rng
from ..negatives.uniform import draw_uniform
from .teacher_settings import TeacherSettings
from ..supervision import SuppliedData
from .record_settings import RecordStageSettings
from .record_stage import run_record_stage
from .writer import Shard

logger = logging.getLogger(__name__)

MISSING_ANSWERS = ("query", "generate", "error")
TARGETS = ("auto", "answer", "query", "relevance")
SIGNALS = ("answer", "query", "relevance")
SIGNAL_OF_TARGET = {"answer": "answer", "generated_answer": "answer", "query": "query", "relevance": "relevance"}
Unit = tuple[str, "list[str] | None", "list[float] | None"]  # (qid, listed candidates, their retriever scores)


@dataclass(kw_only=True)
class LabelConfig(TeacherSettings, RecordStageSettings):
    data: str = field(metadata={"help": "BEIR-style folder or embedded set name"})
    output: Path = field(metadata={"help": "labels JSON Lines file to write (resumes if partly written)"})
    split: str = field(default="train", metadata={"help": "qrels split whose queries are labelled"})
    candidates: Path | None = field(default=None, metadata={"help": "candidates JSONL from `distill mine`; "
                                                                    "default: positives + --num-random random passages"})
    num_random: int = field(default=7, metadata={"help": "random passages per query when there is no --candidates"})
    language: str = field(default="en", metadata={"help": "language of the default prompts", "choices": ["en", "zh"]})
    prompt: str | None = field(default=None, metadata={
        "help": "answer-likelihood template: packaged name or file (default: reward_<language>[_chat])"})
    query_prompt: str | None = field(default=None, metadata={
        "help": "query-likelihood template for queries without answers (default: query_likelihood_<language>[_chat])"})
    relevance_prompt: str | None = field(default=None, metadata={
        "help": "relevance template for --target relevance and --signals relevance (default: "
                "relevance_<language>[_chat])"})
    target: str = field(default="auto", metadata={
        "help": "what the teacher scores: auto (the reference answers where a query has some, else see "
                "--missing-answers), answer (answer likelihood, every query needs answers), query (query "
                "likelihood log p(q | passage) for every query, answers unused: UPR) or relevance (log p(Yes) - log p(No) "
                "after asking whether the passage answers the query, Gecko; answers unused)", "choices": list(TARGETS)})
    signals: list[str] = field(default_factory=list, metadata={
        "help": f"further signals scored in the same pass and written as a named map beside the rewards, from "
                f"{', '.join(SIGNALS)}; answer needs answers on every query (default: none)", "metavar": "SIGNAL"})
    missing_answers: str = field(default="query", metadata={
        "help": "queries without answers: score query likelihood (UPR), have the LLM write an answer from the "
                "positive passage, or stop with an error", "choices": list(MISSING_ANSWERS)})
    normalization: str = field(default="mean", metadata={"help": "reward = mean or sum of answer-token log-probs",
                                                         "choices": ["mean", "sum"]})
    max_passage_tokens: int = field(default=MAX_PASSAGE_TOKENS, metadata={"help": "passages are cut to this many teacher tokens"})
    max_answer_tokens: int = field(default=32, metadata={"help": "--missing-answers generate: answer length limit"})
    include_title: bool = field(default=True, metadata={"help": "show the teacher 'title text'"})
    chunk_size: int = field(default=16, metadata={"help": "queries per fsync'd output chunk (and per backend call)"})
    reuse: Path | None = field(default=None, metadata={
        "help": "labels already scored with these very settings for some of the queries (distill check-teacher's "
                "--output): their lines are taken as they are, not scored again"})


    def __post_init__(self) -> None:
        super().__post_init__()
        for name, least in (("num_random", 0), ("max_passage_tokens", 1), ("max_answer_tokens", 1)):
            if getattr(self, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown or len(set(self.signals)) != len(self.signals):
            raise UsageError(f"--signals {' '.join(self.signals)}: each of {', '.join(SIGNALS)} at most once"
                             + (f"; {unknown[0]!r} is not a signal" if unknown else ""))

    def check_against(self, data: SuppliedData) -> None:
        if self.target == "answer" and data.answers is False:
            raise UsageError(f"--target answer scores reference answers; {data.where} has none: use --target query")
        if "answer" in self.signals and data.answers is False:
            raise UsageError(f"--signals answer scores reference answers; {data.where} has none: leave it out")
        if not data.labelled and not self.candidates:
            raise UsageError(f"{data.where} has no qrels: give --candidates (the retriever's pool per query, from "
                             "distill mine) for the teacher to score")
        if not data.labelled and self.missing_answers == "generate":
            raise UsageError("--missing-answers generate writes an answer from the query's positive passage; "
                             f"{data.where} has no qrels: use --missing-answers query (UPR)")


class Labeler:
    """The label stage (a `RecordStage`): a slice of the job's queries into label records, deterministic in the
    slice."""

    desc, unit = "label", "query"

    def __init__(self, cfg: LabelConfig, rset: RetrievalSet, units: list[Unit],
                 shard: Shard = Shard()):
        self.cfg, self.rset, self.units, self.shard = cfg, rset, units, shard
        self.tokenizer = cfg.load_tokenizer()
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.answer_inputs = RewardInputs(self.tokenizer, resolve_template(
            cfg.prompt, "reward", cfg.language, chat), cfg.max_passage_tokens)
        self.query_inputs = RewardInputs(self.tokenizer, resolve_template(
            cfg.query_prompt, "query_likelihood", cfg.language, chat), cfg.max_passage_tokens)
        if self.answer_inputs.template.continuation != "answer":
            raise UsageError(f"--prompt {self.answer_inputs.template.name} scores the question; it must score answers")
        if self.query_inputs.template.continuation != "question":
            raise UsageError(f"--query-prompt {self.query_inputs.template.name} must score the question")
        self.relevance_inputs = RewardInputs(self.tokenizer, resolve_template(
            cfg.relevance_prompt, "relevance", cfg.language, chat), cfg.max_passage_tokens)
        if self.relevance_inputs.template.continuation != "relevance":
            raise UsageError(f"--relevance-prompt {self.relevance_inputs.template.name} must be a relevance template "
                             "(## continuation: relevance)")
        self.inputs = {"answer": self.answer_inputs, "query": self.query_inputs, "relevance": self.relevance_inputs}
        table = rset.queries.table
        self.query = {qid: (text, answers or []) for qid, text, answers in
                      zip(table["id"].to_pylist(), table["text"].to_pylist(), table["answers"].to_pylist())}
        self.backend = None
        self.tokens = 0
        self.labels = 0
        self.reused: dict[str, dict] = {}

    def prompt_names(self) -> dict[str, str]:
        names = {"answer": self.answer_inputs.template.name, "query": self.query_inputs.template.name}
        if self.cfg.target == "relevance" or "relevance" in self.cfg.signals:  # absent before: those jobs resume
            names["relevance"] = self.relevance_inputs.template.name
        return names

    @property
    def n_units(self) -> int:
        return len(self.units)

    def settings(self) -> dict:
        """What the output depends on; resuming with anything else changed is refused."""
        cfg = self.cfg
        # `target` auto is what every labels file was before the setting existed: left out, their jobs resume
        exclude = ("data", "output", "candidates", "shard", "prompt", "query_prompt", "relevance_prompt",
                   "reuse") + (("target",) if cfg.target == "auto" else ()) + (() if cfg.signals else ("signals",))
        settings = output_settings(cfg, exclude=exclude)
        settings.update(prompts=self.prompt_names(), shard=str(self.shard), data=self.rset.fingerprint(),
                        candidates=file_digest(cfg.candidates) if cfg.candidates else None)
        if cfg.reuse:  # a job that takes another's lines depends on them (absent otherwise: older jobs resume)
            settings["reused"] = file_digest(cfg.reuse)
        return settings

    def load_reuse(self) -> None:
        """The lines of `--reuse` by query, once they are shown to be this job's: written with the same settings
        (the check labels some of the same queries with the label stage's settings) and finished."""
        if not self.cfg.reuse:
            return
        progress = verified_progress(Path(self.cfg.reuse))
        mine = {k: v for k, v in canonical(self.settings()).items() if k != "reused"}
        theirs = canonical((progress or {}).get("settings") or {})
        if progress is None or not progress["complete"] or theirs != {**mine, "shard": theirs.get("shard")}:
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k != "shard")
            raise UsageError(f"--reuse {self.cfg.reuse}: " + ("is not a finished labels job" if not progress or not
                             progress["complete"] else f"was scored with other settings ({', '.join(differ)})")
                             + "; its lines cannot stand for this job's")
        lines = Path(self.cfg.reuse).read_text(encoding="utf-8").splitlines()
        self.reused = {record.qid: json.loads(line) for record, line in zip(read_labels(self.cfg.reuse), lines)}

    def start(self) -> None:
        self._backend()

    def postfix(self, seconds: float) -> str:
        seconds = max(seconds, 1e-9)
        return f"{self.labels / seconds:.1f} labels/s, {self.tokens / seconds:.0f} tok/s"

    def _backend(self):
        if self.backend is None:
            self.backend = self.cfg.create_backend(self.cfg.seed)
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def candidates_of(self, qid: str, listed: list[str] | None) -> tuple[list[str], int]:
        """(pids with the positives first, number of positives)."""
        positives = self.rset.positives(qid)
        if listed is not None:
            return positives + [p for p in listed if p not in set(positives)], len(positives)
        rows = draw_uniform(len(self.rset.corpus), self.rset.corpus.rows_of(positives), self.cfg.num_random,
                            query_rng(self.cfg.seed, qid))
        return positives + self.rset.corpus.ids_at(rows), len(positives)

    def process(self, start: int, stop: int) -> list[dict]:
        units = self.units[start:stop]
        fresh = [u for u in units if u[0] not in self.reused]
        computed = iter(self._score(fresh) if fresh else [])
        return [self.reused[u[0]] if u[0] in self.reused else next(computed) for u in units]

    def _score(self, units: list[Unit]) -> list[dict]:
        cfg, corpus = self.cfg, self.rset.corpus
        jobs = []
        for qid, listed, retriever_scores in units:
            pids, n_pos = self.candidates_of(qid, listed)
            passages = corpus.passages_at(corpus.rows_of(pids), include_title=cfg.include_title)
            question, answers = self.query[qid]
            if cfg.target in ("query", "relevance"):
                target = cfg.target
            elif answers:
                target = "answer"
            else:
                target = {"query": "query", "generate": "generated_answer"}.get(cfg.missing_answers)
            if target is None or (target != "answer" and cfg.target == "answer"):
                raise DataError(f"{self.rset.queries.path}: query {qid!r} has no answers (--target answer or "
                                "--missing-answers error); use --missing-answers query or generate")
            jobs.append({"qid": qid, "pids": pids, "n_pos": n_pos, "passages": passages, "question": question,
                         "answers": list(answers), "target": target, "retriever_scores": retriever_scores})
        self._write_missing_answers([j for j in jobs if j["target"] == "generated_answer"])
        # every (job, signal) scored once: the targets' rewards first, one backend call per kind (in the order
        # labels files were always made), then each --signals one not scored as a target
        scored: dict[tuple[int, str], list] = {}
        calls = [(SIGNAL_OF_TARGET[kind], [i for i, j in enumerate(jobs) if j["target"] == kind])
                 for kind in ("answer", "generated_answer", "query", "relevance")]
        calls += [(name, [i for i, j in enumerate(jobs) if SIGNAL_OF_TARGET[j["target"]] != name])
                  for name in cfg.signals]
        for name, chosen in calls:
            if not chosen:
                continue
            for i in chosen:
                if name == "answer" and not jobs[i]["answers"]:
                    raise DataError(f"{self.rset.queries.path}: query {jobs[i]['qid']!r} has no answers, which "
                                    "--signals answer scores; leave it out or give every query answers")
            groups = [RewardGroup(jobs[i]["question"], jobs[i]["answers"], jobs[i]["passages"]) for i in chosen]
            for i, rewards in zip(chosen, score_groups(self._backend(), self.inputs[name], groups, cfg.normalization)):
                scored[i, name] = rewards
        records = []
        for i, job in enumerate(jobs):
            target = job["target"]
            rewards = scored[i, SIGNAL_OF_TARGET[target]]
            record = LabelRecord(
                job["qid"], tuple(job["pids"]), tuple(r.value for r in rewards), job["n_pos"],
                n_tokens=tuple(r.score.n_tokens for r in rewards), target=target, model=cfg.llm,
                prompt=self.inputs[SIGNAL_OF_TARGET[target]].template.name, normalization=cfg.normalization,
                # queries without qrels: the pool's retriever scores, which training fuses with the rewards
                retriever_scores=None if job["retriever_scores"] is None else tuple(job["retriever_scores"]),
                answer_index=tuple(r.answer_index for r in rewards) if target == "answer" else None,
                answer=job["answers"][0] if target == "generated_answer" else None,
                signals={name: tuple(r.value for r in scored[i, name]) for name in cfg.signals} or None)
            records.append(record.to_json())
            self.labels += len(rewards)
        self.tokens = sum(inputs.tokens_built for inputs in self.inputs.values())
        return records

    def _write_missing_answers(self, jobs: list[dict]) -> None:
        """The LLM answers each question from its first positive passage (greedy); empty answers fall back."""
        if not jobs:
            return
        prompts = [self.tokenizer(self.answer_inputs.prompt_text(j["question"], j["passages"][0]),
                                  add_special_tokens=not self.answer_inputs.template.chat)["input_ids"] for j in jobs]
        for job, (answer,) in zip(jobs, self._backend().generate(prompts, self.cfg.max_answer_tokens)):
            if answer:
                job["answers"] = [answer]
            else:
                job["target"] = "query"


def build_labeler(cfg: LabelConfig) -> tuple[Labeler, RetrievalSet, int]:
    """The label stage for `cfg` (data read and checked), and how many split queries have no candidates line."""
    shard = Shard.parse(cfg.shard)
    rset = load_retrieval_set(cfg.data, cfg.split, skip_invalid=cfg.skip_invalid, unlabelled=True)
    cfg.check_against(SuppliedData.of(rset))
    if cfg.candidates:
        units: list[Unit] = [(r.qid, list(r.pids), None if rset.labelled or r.scores is None else list(r.scores))
                             for r in read_candidates(Path(cfg.candidates), rset)]
    else:
        units = [(qid, None, None) for qid in rset.queries.ids]
    if not units:
        raise DataError(f"{cfg.candidates}: holds no candidates line, so there is nothing to label")
    uncovered = len(rset.queries) - len(units)
    start, stop = shard.bounds(len(units))
    labeler = Labeler(cfg, rset, units[start:stop], shard)
    labeler.load_reuse()
    return labeler, rset, uncovered


def labeler_for(cfg: LabelConfig) -> Labeler:
    """What each Ray actor builds (a module-level function, so Ray can ship it)."""
    return build_labeler(cfg)[0]


def run_label(cfg: LabelConfig) -> dict:
    cfg.check_llm()
    if not cfg.show_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    labeler, rset, uncovered = build_labeler(cfg)
    if uncovered:
        print(f"{uncovered} of {len(rset.queries)} {cfg.split} queries have no line in {cfg.candidates}: they are not "
              "labelled (mine them too, or label without --candidates to score their positives and random passages)")
    output, n = Path(cfg.output), labeler.n_units
    started = time.perf_counter()
    run = run_record_stage(labeler, output, chunk_size=cfg.chunk_size, overwrite=cfg.overwrite,
                           show_progress=cfg.show_progress, executor=cfg, factory=functools.partial(labeler_for, cfg))
    if run.already_complete:
        return {"output": str(output), "queries": n, "skipped": True}
    summary = run.job
    elapsed = time.perf_counter() - started
    if cfg.executor == "ray":  # the counting happened in the actors
        labeler.labels = sum(len(r.pids) for r in read_labels(output))
    report = {"output": str(output), "queries": n, "resumed_from": summary.resumed_from,
              "labels": labeler.labels, "tokens": labeler.tokens, "seconds": round(elapsed, 2),
              "shard": str(labeler.shard), "queries_without_candidates": uncovered,
              "boundary_merges": sum(inputs.boundary_merges for inputs in labeler.inputs.values()),
              "reused": sum(u[0] in labeler.reused for u in labeler.units)}
    print(f"labelled {n - summary.resumed_from} queries ({labeler.labels} passages) in {elapsed:.1f} s"
          + (f", resumed after {summary.resumed_from}" if summary.resumed_from else "")
          + (f", {report['reused']} taken from {cfg.reuse} as they were" if report["reused"] else "") + f" -> {output}")
    if rset.problems.total:
        print(rset.problems.summary())
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "label", LabelConfig, run_label,
                help="score candidate passages with a teacher LLM (soft labels)",
                description=__doc__.split("\n\n")[0])
