"""Hard negatives that follow the student while it trains.

- ANCE (Xiong et al., ICLR 2021): every `remine_steps` steps the corpus is
  re-embedded with the current student and every example's pool is mined
  again from the refreshed index.
- Conan-Embedding's dynamic rule (Li et al. 2024): each example's mean
  negative score is tracked as it trains; every `dynamic_steps` steps an
  example whose score s satisfies s·1.15 < s_0 (its score when its pool was
  mined) and |s| < 0.8 has negatives that stopped being hard, and only those
  examples are mined again.

A pool is re-mined with a `distill.negatives` strategy (`dense` rank window or
`simans`) over the student's scores. When the training objective needs
teacher rewards, candidates come from the example's labelled candidates
(whose rewards are known); otherwise from the whole corpus (faiss top-K).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from labelers.errors import UsageError

from ..data import RetrievalSet
from ..negatives import STRATEGIES, MiningBatch, Ranked, CandidateWindow, query_rng
from .examples import Example

logger = logging.getLogger(__name__)


def due(step: int, every: int, total_steps: int) -> bool:
    """Whether to re-mine after `step`: every `every` steps, while at least half an interval of steps is left to
    train on the new negatives (a refresh at step 75 of 76 would cost a full re-embedding for one step)."""
    return every > 0 and step % every == 0 and 2 * (total_steps - step) >= every


@dataclass
class RemineSettings:
    strategy: str = "dense"
    pool_size: int = 7
    params: CandidateWindow = field(default_factory=CandidateWindow)
    seed: int = 0
    from_labels: bool = False      # candidates = the labelled pool (objective needs rewards)
    include_title: bool = True
    batch_size: int = 64
    factor: float = 1.15           # Conan: re-mine when s·factor < s_0 ...
    max_abs_score: float = 0.8     # ... and |s| < max_abs_score


@dataclass
class ScoreTracker:
    """Mean negative score per example: when its pool was mined (s_0) and the latest seen in training."""

    initial: dict[int, float] = field(default_factory=dict)
    latest: dict[int, float] = field(default_factory=dict)

    def observe(self, example: int, mean_negative_score: float) -> None:
        self.initial.setdefault(example, mean_negative_score)
        self.latest[example] = mean_negative_score

    def stale(self, factor: float, max_abs_score: float) -> list[int]:
        """Examples whose negatives got easy: s·factor < s_0 and |s| < max_abs_score."""
        return sorted(i for i, s in self.latest.items()
                      if s * factor < self.initial[i] and abs(s) < max_abs_score)

    def reset(self, examples: list[int]) -> None:
        for i in examples:
            self.initial.pop(i, None)
            self.latest.pop(i, None)

    def state(self) -> dict:
        return {"initial": self.initial, "latest": self.latest}

    @classmethod
    def from_state(cls, state: dict) -> ScoreTracker:
        return cls({int(k): v for k, v in state["initial"].items()}, {int(k): v for k, v in state["latest"].items()})


def remine(encoder, examples: list[Example], chosen: list[int], rsets: list[RetrievalSet], settings: RemineSettings,
           round_index: int) -> int:
    """Replace the pools of `examples[chosen]` using `encoder`; returns how many pools changed."""
    strategy = STRATEGIES[settings.strategy]
    if "dense" not in strategy.POOLS:
        raise UsageError(f"re-mining needs a dense strategy (dense or simans), not {settings.strategy!r}")
    seed = settings.seed + 7919 * (round_index + 1)  # a new draw each round, the same after a resume
    changed = 0
    for task in sorted({examples[i].task for i in chosen}):
        members = [i for i in chosen if examples[i].task == task]
        rset = rsets[task]
        if settings.from_labels:
            batches = _labelled_batches(encoder, [examples[i] for i in members], rset, settings, seed)
        else:
            batches = _corpus_batches(encoder, [examples[i] for i in members], rset, settings, seed)
        for i, batch in zip(members, batches):
            picked = strategy.select(batch, settings.pool_size, settings.params)[0]
            if not len(picked.rows):
                continue  # nothing survives the window: keep the old pool
            example = examples[i]
            rows = np.asarray(picked.rows, dtype=np.int64)
            if settings.from_labels:
                labelled_rows, labelled_rewards = example.labelled
                reward_of = dict(zip(labelled_rows.tolist(), labelled_rewards.tolist()))
                example.pool_rewards = np.array([reward_of[r] for r in rows.tolist()])
            changed += not np.array_equal(rows, example.pool)
            example.pool = rows
    return changed


def _positive_rows(rset: RetrievalSet, example: Example) -> np.ndarray:
    rows = rset.corpus.rows_of(rset.positives(example.qid))
    masked = [] if example.positives is None else example.positives  # chosen positives, dropped answer matches
    return np.unique(np.concatenate([rows[rows >= 0], [example.positive], masked]).astype(np.int64))


def _labelled_batches(encoder, members: list[Example], rset: RetrievalSet, settings: RemineSettings, seed: int):
    """One MiningBatch per example over its labelled candidates, ranked by the student."""
    queries = encoder.encode([e.query for e in members], kind="query", batch_size=settings.batch_size)
    rows = np.unique(np.concatenate([np.concatenate([e.labelled[0], [e.positive]]) for e in members]))
    vectors = encoder.encode(rset.corpus.passages_at(rows, settings.include_title), kind="passage",
                             batch_size=settings.batch_size)
    position = {r: k for k, r in enumerate(rows.tolist())}
    for q, example in zip(queries, members):
        candidates = example.labelled[0]
        scores = vectors[[position[r] for r in candidates.tolist()]] @ q
        order = np.lexsort((candidates, -scores))
        yield MiningBatch(qids=[example.qid], excluded=[_positive_rows(rset, example)],
                          rngs=[query_rng(seed, example.qid)], corpus_size=len(rset.corpus),
                          positive_scores=np.array([vectors[position[example.positive]] @ q], dtype=np.float32),
                          dense=Ranked(candidates[order][None, :], scores[order][None, :].astype(np.float32)))


def _corpus_batches(encoder, members: list[Example], rset: RetrievalSet, settings: RemineSettings, seed: int):
    """One MiningBatch per example from a faiss top-K over the freshly embedded corpus."""
    from ..index import build_index, search

    passages = encoder.encode(list(_all_passages(rset, settings.include_title)), kind="passage",
                              batch_size=settings.batch_size, show_progress=False)
    index = build_index(passages)
    queries = encoder.encode([e.query for e in members], kind="query", batch_size=settings.batch_size)
    depth = min(len(rset.corpus), settings.params.range_max + 1 + max(len(rset.positives(e.qid)) for e in members))
    scores, rows = search(index, queries, depth)
    for b, example in enumerate(members):
        excluded = _positive_rows(rset, example)
        yield MiningBatch(qids=[example.qid], excluded=[excluded], rngs=[query_rng(seed, example.qid)],
                          corpus_size=len(rset.corpus),
                          positive_scores=np.array([float((passages[excluded] @ queries[b]).min())], dtype=np.float32),
                          dense=Ranked(rows[b:b + 1], scores[b:b + 1]))


def _all_passages(rset: RetrievalSet, include_title: bool):
    for chunk in rset.corpus.iter_passages(include_title=include_title):
        yield from chunk
