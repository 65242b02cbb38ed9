"""Which passage of a query's pool is its positive, when the data has no relevance labels.

A query's pool is the retriever's top K (`distill mine`), each passage with the teacher's reward r (`distill
label`: answer likelihood, or query likelihood log p(q | passage) without answers, UPR) and the retriever's
score s. The modes, each a pure function of those arrays:

- `teacher`: argmax r (ART, Sachan et al. 2022; UPR, Sachan et al. 2022).
- `teacher+retriever`: argmax of z(r) + z(s), each z-normalised within the pool, z(x) = (x - mean x) / std x:
  the teacher re-ranks what the retriever found, as UPR does, without dropping the retriever's evidence.
- `answer-match`: DPR's distant supervision (Karpukhin et al. 2020): the highest-ranked passage that contains a
  reference answer as a run of tokens, after lower-casing and removing punctuation.
- `answer-match+teacher`: the passages that contain an answer, and among them the best z(r) + z(s); when none
  contains one, the best z(r) + z(s) of the whole pool.
- `retriever-top1`: argmax s (self-training).

A choice is confident when its score beats the pool's second best by at least `min_margin` (in z units), or,
for answer matching, when a passage matched; training leaves the others out and counts them.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from labelers.errors import UsageError

POSITIVE_MODES = ("qrels", "teacher", "teacher+retriever", "answer-match", "answer-match+teacher", "retriever-top1")
NEEDS_RETRIEVER = ("teacher+retriever", "answer-match+teacher", "retriever-top1")
NEEDS_ANSWERS = ("answer-match",)


@dataclass(frozen=True)
class Choice:
    index: int | None      # the chosen passage's position in the pool; None: no confident choice
    reason: str | None     # why there is none: "not confident" or "no answer match"
    score_margin: float | None = None  # best minus second best of the mode's score (z units), when scored


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std within the pool; all zeros when the pool's values are equal."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std()
    return np.zeros_like(x) if std == 0 or len(x) < 2 else (x - x.mean()) / std


def answer_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation removed (every Unicode P* character), DPR's normalisation."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in unicodedata.normalize("NFKC", text))
    return re.findall(r"\w+", text.lower())


def contains_answer(passage: str, answers: list[str]) -> bool:
    """Whether one of `answers` occurs in `passage` as a contiguous run of tokens."""
    words = answer_tokens(passage)
    for answer in answers:
        target = answer_tokens(answer)
        n = len(target)
        if n and any(words[i:i + n] == target for i in range(len(words) - n + 1)):
            return True
    return False


def _best(score: np.ndarray, among: np.ndarray, min_margin: float) -> Choice:
    order = among[np.argsort(-score[among], kind="stable")]
    margin = float(score[order[0]] - score[order[1]]) if len(order) > 1 else float("inf")
    if margin < min_margin or margin == 0.0:  # a tie is never a choice
        return Choice(None, "not confident", margin)
    return Choice(int(order[0]), None, margin)


def choose_positive(mode: str, rewards: np.ndarray, retriever_scores: np.ndarray | None,
                    matches: np.ndarray | None, min_margin: float = 0.0) -> Choice:
    """The pool position of the query's positive under `mode` (see the module docstring).

    `rewards` and `retriever_scores` are aligned with the pool (retriever order, best first, when scores are
    absent); `matches[i]` says whether passage i contains a reference answer."""
    rewards = np.asarray(rewards, dtype=np.float64)
    everything = np.arange(len(rewards))
    if mode == "teacher":
        return _best(zscore(rewards), everything, min_margin)
    if mode in NEEDS_RETRIEVER and retriever_scores is None:
        raise UsageError(f"--positives {mode} needs the retriever's scores of each pool (labels written from a "
                         "candidates file of distill mine with a --model)")
    if mode == "retriever-top1":
        return _best(zscore(retriever_scores), everything, min_margin)
    fused = None if retriever_scores is None else zscore(rewards) + zscore(retriever_scores)
    if mode == "teacher+retriever":
        return _best(fused, everything, min_margin)
    if matches is None:
        raise UsageError(f"--positives {mode} needs the queries' reference answers")
    matched = np.flatnonzero(matches)
    if mode == "answer-match":
        if not len(matched):
            return Choice(None, "no answer match")
        if retriever_scores is None:
            return Choice(int(matched[0]), None)
        return Choice(int(matched[np.argmax(np.asarray(retriever_scores)[matched])]), None)
    if mode == "answer-match+teacher":
        if len(matched):
            choice = _best(fused, matched, 0.0) if len(matched) > 1 else Choice(int(matched[0]), None)
            return choice if choice.index is not None else Choice(int(matched[0]), None)
        return _best(fused, everything, min_margin)
    raise UsageError(f"--positives {mode!r} is not known; choose one of {list(POSITIVE_MODES)}")


# ----- a fusion whose weights are fitted on the data in hand ----------------------------------------------------

WEIGHT_GRID = (0.0, 0.5, 1.0, 2.0)  # weights tried per signal, on its within-pool z-scores
RRF_K = 60                          # Cormack, Clarke & Buettcher (SIGIR 2009); Gecko fuses its two prompts so


@dataclass(frozen=True)
class FusionRule:
    """How several signals of a pool (the teacher's rewards, the retriever's scores, other teacher signals) make
    one score: sum_s w_s z(x_s), or reciprocal-rank fusion sum_s 1 / (k + rank_s) when `rrf`."""

    weights: tuple[tuple[str, float], ...]   # (signal, weight), in the order the signals were given
    rrf: bool = False
    evidence: str = ""                       # what the weights were chosen on, e.g. "412 answer-matched queries"
    accuracy: float | None = None            # share of those queries whose known positive the rule puts first

    def score(self, signals: dict[str, np.ndarray]) -> np.ndarray:
        if self.rrf:
            total = np.zeros(len(next(iter(signals.values()))))
            for name, weight in self.weights:
                if weight:
                    ranks = np.empty(len(signals[name]), dtype=np.float64)
                    ranks[np.argsort(-np.asarray(signals[name], dtype=np.float64), kind="stable")] = np.arange(
                        1, len(ranks) + 1)
                    total += weight / (RRF_K + ranks)
            return total
        return sum(weight * zscore(signals[name]) for name, weight in self.weights if weight)

    def describe(self) -> str:
        used = [(n, w) for n, w in self.weights if w]
        how = ("reciprocal-rank fusion of " + " and ".join(n for n, _ in used) if self.rrf else
               " + ".join(f"{w:g} x {n}" if w != 1 else n for n, w in used))
        fit = f", fitted on {self.evidence}" if self.evidence else ""
        acc = f" (known positive first for {self.accuracy:.0%} of them)" if self.accuracy is not None else ""
        return how + fit + acc


def hits_known_first(score: np.ndarray, known: np.ndarray) -> bool:
    """The pool's best score is a known positive's, strictly (a tie with an unknown passage is no hit)."""
    known = np.asarray(known, dtype=bool)
    if known.all():
        return True
    return bool(known.any() and score[known].max() > score[~known].max())


def fit_fusion(pools: list[dict[str, np.ndarray]], known: list[np.ndarray], evidence: str,
               grid: tuple[float, ...] = WEIGHT_GRID) -> FusionRule:
    """The rule that puts a known positive first most often on queries whose positive is known (silver answer
    matches, or a few labelled queries), among every weighting of the z-scored signals on `grid` (each signal
    alone among them) and the reciprocal-rank fusion of all of them.

    Since each signal alone is a candidate, on these queries the rule is never below its best single signal.
    Ties go to the rule that uses more signals (more evidence, less variance), then to the earlier one; weights
    that differ only in scale are one rule."""
    import itertools

    names = list(pools[0])
    candidates, seen = [], set()
    for weights in itertools.product(grid, repeat=len(names)):
        top = max(weights)
        if not top:
            continue
        key = tuple(round(w / top, 6) for w in weights)
        if key not in seen:
            seen.add(key)
            candidates.append(FusionRule(tuple(zip(names, key))))
    candidates.append(FusionRule(tuple((n, 1.0) for n in names), rrf=True))

    def accuracy(rule: FusionRule) -> float:
        return float(np.mean([hits_known_first(rule.score(p), k) for p, k in zip(pools, known)])) if pools else 0.0

    scored = [(accuracy(rule), sum(1 for _, w in rule.weights if w), -i, rule) for i, rule in enumerate(candidates)]
    best_accuracy, _, _, best = max(scored, key=lambda s: s[:3])
    return FusionRule(best.weights, best.rrf, evidence, best_accuracy)
