"""Filters for LLM-written (question, answer) pairs, each a pure function over a list of pairs.

Every filter has the signature `(pairs, settings) -> [bool]` (True = remove)
and is registered in `FILTERS` under the name the reports use. `apply_filters`
runs a chosen sequence in order, each on the pairs the earlier ones kept, and
counts what each removed, so a report can say "copied: 31 removed".

- parse:       the completion had no question or no answer (the answer label never came);
- length:      question or answer shorter or longer than the limits (characters);
- copied:      the question is (nearly) a verbatim span of its passage, or of one of the
               prompt's few-shot questions or passages (small LLMs repeat the last example
               question, or recite an example's passage as a "question"): the longest
               common substring covers >= max_copy_overlap of the normalised question;
- duplicate:   the same normalised question as an earlier pair (anywhere in the corpus);
- unsupported: the answer is unlikely given its own passage, i.e. the teacher's mean
               answer log-prob (the reward of `labelers.reward`) < min_support nats/token;
- round_trip:  Promptagator's round-trip consistency (Dai et al. 2022): keep the pair only
               if its source passage is within the current retriever's top-k for the question.

`unsupported` needs each pair's `support` and `round_trip` its source passage's
`rank`; the stage computes them only for pairs still standing.
"""
from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from .errors import UsageError


@dataclass
class Pair:
    question: str | None
    answer: str | None
    passage: str
    support: float | None = None   # mean log-prob of the answer given the passage (nats/token)
    rank: int | None = None        # 0-based rank of the source passage for the question; None = not in the top-k


@dataclass(frozen=True)
class FilterSettings:
    min_question_chars: int = 8
    max_question_chars: int = 300
    min_answer_chars: int = 1
    max_answer_chars: int = 150
    max_copy_overlap: float = 0.9
    min_support: float = -4.0  # SmolLM2-135M-Instruct keeps 82% of SQuAD's gold answers at -4 (bench/RESULTS.md)
    round_trip_k: int = 20
    example_texts: tuple[str, ...] = ()  # the few-shot questions and passages the prompt showed (copied filter)


def normalise(text: str) -> str:
    """NFKC, lower case, every run of non-word characters one space (CJK characters are word characters)."""
    return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def parse_failures(pairs: Sequence[Pair], s: FilterSettings) -> list[bool]:
    return [not p.question or not p.answer for p in pairs]


def length_outliers(pairs: Sequence[Pair], s: FilterSettings) -> list[bool]:
    return [not (s.min_question_chars <= len(p.question) <= s.max_question_chars
                 and s.min_answer_chars <= len(p.answer) <= s.max_answer_chars) for p in pairs]


def _covered(question: str, text: str) -> int:
    """Length of the longest common substring of two normalised texts."""
    return difflib.SequenceMatcher(None, question, text, autojunk=False).find_longest_match(
        0, len(question), 0, len(text)).size


def copied_questions(pairs: Sequence[Pair], s: FilterSettings) -> list[bool]:
    examples = [normalise(t) for t in s.example_texts]
    out = []
    for p in pairs:
        question = normalise(p.question)
        out.append(not question or any(_covered(question, text) >= s.max_copy_overlap * len(question)
                                       for text in [normalise(p.passage), *examples]))
    return out


def duplicate_questions(pairs: Sequence[Pair], s: FilterSettings) -> list[bool]:
    seen: set[str] = set()
    out = []
    for p in pairs:
        key = normalise(p.question)
        out.append(key in seen)
        seen.add(key)
    return out


def unsupported_answers(pairs: Sequence[Pair], s: FilterSettings) -> list[bool]:
    if any(p.support is None for p in pairs):
        raise UsageError("the unsupported filter needs each pair's answer support (score them first)")
    return [p.support < s.min_support for p in pairs]


def round_trip_misses(pairs: Sequence[Pair], s: FilterSettings) -> list[bool]:
    return [p.rank is None or p.rank >= s.round_trip_k for p in pairs]


FILTERS: dict[str, Callable[[Sequence[Pair], FilterSettings], list[bool]]] = {
    "parse": parse_failures,
    "length": length_outliers,
    "copied": copied_questions,
    "duplicate": duplicate_questions,
    "unsupported": unsupported_answers,
    "round_trip": round_trip_misses,
}


COPIED_WARNING_SHARE = 0.2  # of all samples; SmolLM2 on squad_dev's passages: 10%, on scifact's abstracts: 37%


def copied_warning(removed: dict[str, int], generated: int) -> str | None:
    """What to tell the user when the copied filter took at least `COPIED_WARNING_SHARE` of the samples: the teacher
    imitates rather than reads these passages (bench/RESULTS.md, "Why so few scifact pairs"), and the cure is few-shot
    examples from the user's own text or a larger teacher. None below the share."""
    copied = removed.get("copied", 0)
    if not generated or copied / generated < COPIED_WARNING_SHARE:
        return None
    return (f"{copied} of {generated} samples ({copied / generated:.0%}) copied their passage or a few-shot example: "
            "give the teacher examples from your own text (--few-shot FILE) or use a larger teacher")


def apply_filters(pairs: Sequence[Pair], names: Sequence[str], settings: FilterSettings,
                  rejected: list[str | None] | None = None) -> tuple[list[str | None], dict[str, int]]:
    """(reason each pair was removed, or None; pairs removed per filter), filters run in `names` order.

    `rejected` carries verdicts from an earlier call: those pairs stay removed and are not looked at."""
    unknown = [n for n in names if n not in FILTERS]
    if unknown:
        raise UsageError(f"unknown filters {unknown}; known: {list(FILTERS)}")
    reasons: list[str | None] = list(rejected) if rejected is not None else [None] * len(pairs)
    counts = {}
    for name in names:
        alive = [i for i, r in enumerate(reasons) if r is None]
        removed = FILTERS[name]([pairs[i] for i in alive], settings)
        counts[name] = 0
        for i, remove in zip(alive, removed):
            if remove:
                reasons[i] = name
                counts[name] += 1
    return reasons, counts
