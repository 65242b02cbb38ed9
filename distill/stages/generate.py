"""`distill generate`: synthetic (query, answer) supervision from raw passages.

For each passage (all of them, or `--max-passages` drawn with `--seed`) the
teacher LLM samples `--questions-per-passage` completions of a query-generation
template (`prompts/generate_<language>[_chat].txt`, with few-shot examples),
each parsed into a question and a short answer. Filters (`labelers.filters`)
then remove, in order, and count: parse failures, length outliers, questions
copied from the passage, answers the teacher finds unlikely given their own
passage (`--min-support`), duplicate questions, and pairs failing Promptagator's
round-trip check (the source passage not in `--retriever`'s top `--round-trip-k`).

Output folder (`--output DIR`), a BEIR folder the next stages take as `--data`:

    DIR/corpus.jsonl            the input corpus
    DIR/queries.jsonl           {"_id", "text", "answers": [answer], "positives": [pid], "support"}
    DIR/qrels/train.tsv         query-id, corpus-id, score (1)
    DIR/generations.jsonl       every sample per passage, with its filter verdict (resumable, sharded)
    DIR/generate_summary.json   counts per filter and the job's settings (written last)

The per-passage work (sampling, parsing, the first four filters: `QuestionSampler`, here) goes through
`stages.writer`: resumable after a kill with identical output, and split with
`--shard i/n` (shard i writes `generations.<i>of<n>.jsonl`; an unsharded run
over the same folder then uses the complete shard files instead of sampling
again). The corpus-wide filters and the folder are written at the end (`stages.generated_folder`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelers.backends import Sampling
from labelers.filters import FILTERS, FilterSettings, Pair, apply_filters
from labelers.generation import PairPrompts, generate_pairs, load_few_shot, packaged_examples
from labelers.prompts import resolve_template
from labelers.reward import MAX_PASSAGE_TOKENS, RewardGroup, RewardInputs, score_groups
from labelers.errors import UsageError

from ..config import add_command, output_settings
from ..data import Corpus, ProblemLog, load_corpus_of
from ..data.records import GeneratedSample, GenerationRecord, read_generations
from ..files import file_digest
from .teacher_settings import TeacherSettings
from .record_settings import RecordStageSettings
from .generated_folder import SUMMARY, final_settings, finish, is_generated, print_summary
from .record_stage import run_record_stage
from .writer import Shard, is_complete, read_progress

logger = logging.getLogger(__name__)

PASSAGE_FILTERS = ("parse", "length", "copied", "unsupported")  # decided per passage, while sampling
CORPUS_FILTERS = ("duplicate", "round_trip")                    # need every pair (or the retriever)
AFTER_SAMPLING = ("round_trip_k", "retriever")  # settings of the corpus-wide filters: changing them keeps the samples
_F = FilterSettings()


@dataclass(kw_only=True)
class GenerateConfig(TeacherSettings, RecordStageSettings):
    data: str = field(metadata={"help": "BEIR-style folder (only its corpus is read) or an embedded set name"})
    output: Path = field(metadata={"help": "folder to write: corpus, synthetic queries, qrels/train.tsv"})
    language: str = field(default="en", metadata={"help": "language of the default prompts", "choices": ["en", "zh"]})
    prompt: str | None = field(default=None, metadata={
        "help": "query-generation template: packaged name or file (default: generate_<language>[_chat])"})
    few_shot: Path | None = field(default=None, metadata={
        "help": "few-shot examples, JSON Lines {passage, question, answer} (default: the packaged ones)"})
    num_few_shot: int = field(default=2, metadata={"help": "few-shot examples shown in each prompt (0: none)"})
    questions_per_passage: int = field(default=2, metadata={"help": "completions sampled per passage"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0: greedy, one per passage)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling top-p"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per completion"})
    complete_answers: bool = field(default=True, metadata={
        "help": "a sample that wrote a question but no answer gets one from a greedy second pass"})
    max_passages: int | None = field(default=None, metadata={"help": "sample this many passages (default: all)"})
    min_passage_chars: int = field(default=50, metadata={"help": "passages shorter than this get no questions"})
    filters: list[str] = field(default_factory=lambda: list(FILTERS), metadata={
        "help": f"filters to apply, from {', '.join(FILTERS)} (parse always runs: an unparsed sample has no pair)"})
    min_question_chars: int = field(default=_F.min_question_chars, metadata={"help": "length filter"})
    max_question_chars: int = field(default=_F.max_question_chars, metadata={"help": "length filter"})
    min_answer_chars: int = field(default=_F.min_answer_chars, metadata={"help": "length filter"})
    max_answer_chars: int = field(default=_F.max_answer_chars, metadata={"help": "length filter"})
    max_copy_overlap: float = field(default=_F.max_copy_overlap, metadata={
        "help": "copied filter: remove when one span of the passage covers this share of the question"})
    min_support: float = field(default=_F.min_support, metadata={
        "help": "unsupported filter: least mean log-prob (nats/token) of the answer given its passage"})
    round_trip_k: int = field(default=_F.round_trip_k, metadata={
        "help": "round_trip filter: the source passage must be in the retriever's top k"})
    retriever: str = field(default="sentence-transformers/all-MiniLM-L6-v2", metadata={
        "help": "dense encoder for the round_trip filter (usually the student to be trained)"})
    support_prompt: str | None = field(default=None, metadata={
        "help": "answer-likelihood template for the unsupported filter (default: reward_<language>[_chat])"})
    max_passage_tokens: int = field(default=MAX_PASSAGE_TOKENS, metadata={"help": "passages are cut to this many teacher tokens"})
    include_title: bool = field(default=True, metadata={"help": "show the teacher 'title text'"})
    chunk_size: int = field(default=32, metadata={  # 32 x 2 samples: a decoding step costs ~35 ms + ~2.5 ms a row
        "help": "passages per fsync'd output chunk (and per backend call)"})
    batch_size: int = field(default=64, metadata={"volatile": True, "help": "retriever: texts per encoder batch"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown:
            raise UsageError(f"--filters: unknown {unknown}; known: {list(FILTERS)}")
        for name, least in (("questions_per_passage", 1), ("num_few_shot", 0), ("max_new_tokens", 1),
                            ("round_trip_k", 1), ("max_passage_tokens", 1), ("min_passage_chars", 0)):
            if getattr(self, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        if self.max_passages is not None and self.max_passages < 1:
            raise UsageError(f"--max-passages must be >= 1, got {self.max_passages}")
        self.sampling()  # temperature >= 0 and 0 < top_p <= 1
        if self.few_shot is not None and self.num_few_shot:
            load_few_shot(self.few_shot)  # a bad examples file stops the run now, not after the passages are read

    def few_shot_examples(self) -> list:
        """The examples each prompt shows (the packaged ones unless --few-shot names a file)."""
        if not self.num_few_shot:
            return []
        return load_few_shot(self.few_shot or packaged_examples(self.language))[:self.num_few_shot]

    def filter_settings(self, few_shot: list) -> FilterSettings:
        examples = tuple(text for e in few_shot for text in (e.question, e.passage))
        return FilterSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FilterSettings)
                                 if hasattr(self, f.name)}, example_texts=examples)

    def sampling(self) -> Sampling:
        n = 1 if self.temperature == 0 else self.questions_per_passage
        return Sampling(temperature=self.temperature, top_p=self.top_p, n=n, seed=self.seed)


def selected_rows(corpus: Corpus, cfg: GenerateConfig) -> np.ndarray:
    """Rows of the passages to write questions for, in corpus order: long enough, then sampled with the seed."""
    from pyarrow import compute as pc

    lengths = pc.utf8_length(corpus.table["text"]).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(lengths >= cfg.min_passage_chars)
    if cfg.max_passages is not None and cfg.max_passages < len(rows):
        rows = np.sort(np.random.default_rng(cfg.seed).choice(rows, cfg.max_passages, replace=False))
    return rows


class QuestionSampler:
    """The generate stage's sampling (a `RecordStage`): for a slice of the job's passages, the teacher's
    samples, parsed and put through the per-passage filters; deterministic in the slice."""

    desc, unit = "generate", "passage"

    def __init__(self, cfg: GenerateConfig, corpus: Corpus, rows: np.ndarray, shard: Shard = Shard()):
        self.cfg, self.corpus, self.rows, self.shard = cfg, corpus, rows, shard
        tokenizer = cfg.load_tokenizer()
        chat = bool(getattr(tokenizer, "chat_template", None))
        template = resolve_template(cfg.prompt, "generate", cfg.language, chat)
        few_shot = cfg.few_shot_examples()
        self.prompts = PairPrompts(tokenizer, template, few_shot, cfg.max_passage_tokens)
        self.support = RewardInputs(tokenizer, resolve_template(
            cfg.support_prompt, "reward", cfg.language, chat), cfg.max_passage_tokens)
        if self.support.template.continuation != "answer":
            raise UsageError(f"--support-prompt {self.support.template.name} must score answers")
        self.filters = [f for f in PASSAGE_FILTERS if f in cfg.filters]
        self.filter_config = cfg.filter_settings(few_shot)
        self.backend = None
        self.generated = 0

    def template_names(self) -> dict[str, str]:
        return {"generate": self.prompts.template.name, "support": self.support.template.name}

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    @property
    def n_units(self) -> int:
        return len(self.rows)

    def settings(self) -> dict:
        """What the samples depend on; resuming with anything else changed is refused."""
        cfg = self.cfg
        settings = output_settings(cfg, exclude=AFTER_SAMPLING + ("data", "output", "prompt", "support_prompt",
                                                                  "few_shot", "shard", "filters"))
        settings.update(templates=self.template_names(), data=self.corpus.fingerprint(), shard=str(self.shard),
                        seeding="per-sample", stops=list(self.prompts.stops()),
                        filters=[f for f in PASSAGE_FILTERS if f in cfg.filters],
                        few_shot=file_digest(cfg.few_shot) if cfg.few_shot else None)
        return settings

    def start(self) -> None:
        if self.backend is None:
            self.backend = self.cfg.create_backend(self.cfg.seed)

    def postfix(self, seconds: float) -> str:
        return f"{self.generated / max(seconds, 1e-9):.2f} samples/s"

    def process(self, start: int, stop: int) -> list[dict]:
        cfg = self.cfg
        self.start()
        rows = self.rows[start:stop]
        passages = self.corpus.passages_at(rows, include_title=cfg.include_title)
        sampling = cfg.sampling()  # vllm/openai: passage p's j-th sample draws from seed + p * n + j
        sampling = dataclasses.replace(sampling, seed=cfg.seed + start * sampling.n)
        generations = generate_pairs(self.backend, self.prompts, passages, sampling, cfg.max_new_tokens,
                                     cfg.complete_answers)
        self.generated += len(generations)
        pairs = [Pair(g.question, g.answer, passages[g.passage_index]) for g in generations]
        cheap = [f for f in self.filters if f != "unsupported"]
        reasons, _ = apply_filters(pairs, cheap, self.filter_config)
        alive = [i for i, r in enumerate(reasons) if r is None]
        if alive and "unsupported" in self.filters:
            groups = [RewardGroup(pairs[i].question, [pairs[i].answer], [pairs[i].passage]) for i in alive]
            for i, (reward,) in zip(alive, score_groups(self.backend, self.support, groups, "mean")):
                pairs[i].support = reward.value
            reasons, _ = apply_filters(pairs, ["unsupported"], self.filter_config, reasons)
        samples: list[list[GeneratedSample]] = [[] for _ in rows]
        for g, pair, reason in zip(generations, pairs, reasons):
            samples[g.passage_index].append(GeneratedSample(
                g.question, g.answer, None if pair.support is None else round(pair.support, 6), reason, g.raw,
                g.completed))
        return [GenerationRecord(pid, tuple(s)).to_json() for pid, s in zip(self.corpus.ids_at(rows), samples)]


def shard_output(folder: Path, shard: Shard) -> Path:
    return folder / ("generations.jsonl" if shard.count == 1 else f"generations.{shard.index}of{shard.count}.jsonl")


def complete_shards(folder: Path, settings: dict) -> list[Path] | None:
    """Complete shard files covering the job (same settings but the shard), in order; None when there are none."""
    for progress in sorted(folder.glob("generations.*of*.jsonl.progress.json")):
        count = int(progress.name.split("of")[1].split(".")[0])
        paths = [folder / f"generations.{i}of{count}.jsonl" for i in range(count)]
        if all(is_complete(p, {**settings, "shard": f"{i}/{count}"}) for i, p in enumerate(paths)):
            return paths
    return None


def build_sampler(cfg: GenerateConfig) -> tuple[QuestionSampler, ProblemLog]:
    """The sampling stage for `cfg`'s shard of the chosen passages, and the corpus's problem log."""
    shard = Shard.parse(cfg.shard)
    corpus, problems = load_corpus_of(cfg.data, cfg.skip_invalid)
    rows = selected_rows(corpus, cfg)
    start, stop = shard.bounds(len(rows))
    return QuestionSampler(cfg, corpus, rows[start:stop], shard), problems


def sampler_for(cfg: GenerateConfig) -> QuestionSampler:
    """What each Ray actor builds."""
    return build_sampler(cfg)[0]


def run_generate(cfg: GenerateConfig) -> dict:
    shard = Shard.parse(cfg.shard)
    cfg.check_llm()
    if "parse" not in cfg.filters:
        cfg = dataclasses.replace(cfg, filters=["parse", *cfg.filters])
    folder = Path(cfg.output)
    folder.mkdir(parents=True, exist_ok=True)
    sampler, problems = build_sampler(cfg)
    corpus = sampler.corpus
    settings = sampler.settings()
    done = final_settings(cfg, settings)
    if not cfg.overwrite and shard.count == 1 and is_generated(folder, done):
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        print(f"{folder}: already complete; nothing to do")
        print_summary(summary, folder)
        return summary
    if cfg.overwrite:
        (folder / SUMMARY).unlink(missing_ok=True)
    started = time.perf_counter()
    paths = None if (cfg.overwrite or shard.count > 1) else complete_shards(folder, settings)
    if paths is None:
        output = shard_output(folder, shard)
        run_record_stage(sampler, output, chunk_size=cfg.chunk_size, overwrite=cfg.overwrite,
                         show_progress=cfg.show_progress, executor=cfg, factory=functools.partial(sampler_for, cfg))
        paths = [output]
        if shard.count > 1:
            progress = read_progress(output)
            print(f"shard {shard}: {progress['units_done']} passages -> {output}; run without --shard over the same "
                  "--output to finish the folder")
            return {"output": str(output), "shard": str(shard), "passages": sampler.n_units}
    summary = finish(cfg, corpus, read_generations(paths), done, time.perf_counter() - started)
    print_summary(summary, folder)
    if problems.total:
        print(problems.summary())
    return summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "generate", GenerateConfig, run_generate,
                help="have the teacher LLM write (query, answer) pairs for raw passages",
                description=__doc__.split("\n\n")[0])
