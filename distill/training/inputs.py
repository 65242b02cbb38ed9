"""A training run's inputs: its examples, read from the labels, candidates or qrels it is given (checked
finished first), and how long its longest texts may be."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..data import DataError, Queries, RetrievalSet, load_corpus_of, load_retrieval_set
from ..data.tables import QUERY_FIELDS
from ..data.progress import verified_progress
from ..data.records import read_candidates, read_labels
from ..supervision import SuppliedData
from .examples import (ExampleSet, PositiveChoice, examples_from_candidates, examples_from_labels,
                       examples_from_passages, examples_from_qrels)

logger = logging.getLogger(__name__)
LENGTH_SAMPLE = 2048  # texts tokenised to find how long a batch's longest text can be


def check_finished(path, allow_partial: bool) -> None:
    """Refuse a labels/candidates file whose job (`distill label` / `mine`) has not finished, unless allowed."""
    progress = verified_progress(path)
    if progress is None or progress["complete"]:
        return
    done, units = progress["units_done"], progress["units"]
    if not allow_partial:
        raise DataError(f"{path}: unfinished: its progress file records {done} of {units} queries (the job was "
                        "stopped or is still running); rerun the same command to finish it, or pass --allow-partial "
                        f"to train on the {done} done")
    print(f"WARNING: {path} is unfinished ({done} of {units} queries); training on those {done} (--allow-partial)")


def check_made_from(path: Path, rset: RetrievalSet, data: str) -> None:
    """Refuse a labels or candidates file that its progress file says was made from other data than `rset`
    (`distill label` / `mine` record the data's fingerprint: corpus, queries file and the split's qrels).

    Labels from a set without qrels would otherwise train on one with qrels (its labelled positives becoming
    hard negatives), or a set's labels on another set with the same passage ids."""
    progress = verified_progress(path)
    made_from = ((progress or {}).get("settings") or {}).get("data")
    if made_from is None or made_from == rset.fingerprint():
        return
    raise DataError(f"{path}: was made from other data than --data {data} (split {rset.split!r}): its progress "
                    f"file records data {made_from[:12]}, this data is {rset.fingerprint()[:12]} (corpus, queries "
                    "and qrels); give the --data it was made from, or label/mine this data")


def load_training_examples(cfg) -> tuple[list[RetrievalSet], list, dict[str, int]]:
    rsets, examples, skipped = [], [], {}
    for path in (cfg.labels or []) + (cfg.candidates or []):
        check_finished(path, cfg.allow_partial)
    passages_only = cfg.objective().passages_only
    for task, data in enumerate(cfg.data):
        if passages_only:  # SimCSE: the corpus alone; its queries and qrels, if any, are not read
            corpus, problems = load_corpus_of(data, skip_invalid=cfg.skip_invalid)
            rset = RetrievalSet(corpus, no_queries(corpus.path), {}, "corpus", problems)
        else:
            # labels, and candidates whose positives the retriever picks (self-training), need no qrels
            unlabelled = bool(cfg.labels) or bool(cfg.candidates and cfg.positives == "retriever-top1")
            rset = load_retrieval_set(data, cfg.split, skip_invalid=cfg.skip_invalid, unlabelled=unlabelled)
            for files in (cfg.labels, cfg.candidates):
                if files:
                    check_made_from(Path(files[task]), rset, data)
            cfg.check_against(SuppliedData.of(rset))
        if passages_only:
            found = examples_from_passages(rset, task, cfg.include_title)
        elif cfg.labels:
            choice = PositiveChoice(cfg.positives, cfg.min_positive_margin, cfg.false_negatives,
                                    cfg.false_negative_margin, cfg.answer_negatives)
            found: ExampleSet = examples_from_labels(read_labels(cfg.labels[task]), rset, cfg.labels[task],
                                                     cfg.positive, task, drop_disputed=cfg.drop_disputed,
                                                     keep_top_margin=cfg.keep_top_margin, choice=choice,
                                                     include_title=cfg.include_title)
        elif cfg.candidates:
            found = examples_from_candidates(read_candidates(cfg.candidates[task], rset), rset, task,
                                             cfg.positives, cfg.min_positive_margin, cfg.candidates[task])
        else:
            found = examples_from_qrels(rset, task)
        for reason, count in found.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        rsets.append(rset)
        examples.extend(found.examples)
    if not examples:
        dropped = {reason: n for reason, n in skipped.items() if n and "(kept)" not in reason}
        why = "; ".join(f"{n} {reason}" for reason, n in dropped.items())
        hint = ("; --min-positive-margin left out every query whose choice was closer than it: lower it"
                if cfg.min_positive_margin > 0 and any("not confident" in r for r in dropped) else "")
        raise DataError(f"no training examples in {cfg.data} (split {cfg.split!r})"
                        + (f": every query was left out ({why}){hint}" if why else ""))
    return rsets, examples, skipped


def no_queries(path) -> Queries:
    """An empty queries table (a training run on the corpus alone)."""
    columns = {spec.name: pa.array([], spec.arrow_type) for spec in QUERY_FIELDS}
    return Queries(pa.table({**columns, "line": pa.array([], pa.int64())}), Path(path))


def longest_texts(encoder, rsets: list[RetrievalSet], examples: list, include_title: bool,
                  sample: int = LENGTH_SAMPLE, query_kind: str = "query") -> tuple[int, int]:
    """(query, passage) token counts a batch's longest text may reach: the longest of a seeded sample of the
    training queries and of their positives and pool passages, capped by the encoder's max lengths."""
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(examples), size=min(sample, len(examples)), replace=False)
    queries = [examples[i].query for i in chosen]
    passages = []
    per_example = max(1, sample // max(len(chosen), 1))
    for i in chosen:
        example = examples[i]
        rows = np.concatenate([[example.positive], example.pool[:per_example]]).astype(np.int64)
        passages.extend(rsets[example.task].corpus.passages_at(rows, include_title))
    passages = passages[:sample * 2]

    def longest(texts: list[str], kind: str) -> int:
        ids = encoder.tokenizer(encoder.prefixed(texts, kind), truncation=True, max_length=encoder.max_length(kind),
                                return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return max((len(t) for t in ids), default=2)

    return longest(queries, query_kind), longest(passages, "passage")
