"""The teacher's reward: how likely the LLM finds the reference answer (or the query, or "Yes") given a passage.

For query q with reference answer O = (o_1..o_m) and candidate passage C
(LLM-Embedder, Zhang et al. 2023; bge):

    log r(C) = Σ_i log p(o_i | prompt(C, q), o_<i)      (sum, nats)
    mean     = log r(C) / m                              (the original code's score)

Without a reference answer, query likelihood (UPR, Sachan et al. 2022) scores
log p(q | prompt(C)) instead. Relevance classification (Gecko, Lee et al. 2024)
asks whether C answers q (or supports or refutes a claim) and needs no answer:

    r(C) = log p("Yes" | prompt(C, q)) - log p("No" | prompt(C, q))   (sums, nats)

the two continuations share their prompt (the hf backend runs it once).
`RewardInputs.build` makes the token ids: the
continuation's tokens are exactly those of tokenize(prompt + separator +
continuation) after the prompt's own tokens; when BPE merges across that
boundary, the continuation is tokenised on its own instead (and counted).
Only the passage is truncated, by tokens and at a character boundary; the
question and the answer never are. BOS comes once: from the tokenizer for
plain prompts, from the chat template for chat prompts.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .backends.base import Backend, Score
from .prompts import PromptTemplate
from .errors import UsageError

logger = logging.getLogger(__name__)

NORMALIZATIONS = {"mean": lambda s: s.logprob_mean, "sum": lambda s: s.logprob_sum}


MAX_PASSAGE_TOKENS = 1024
"""Default cut for a passage shown to the teacher. Long enough to keep the answer: SmolLM2's English-first
tokenizer spends ~1.8 tokens per Chinese character, so a 384-token cut dropped the answer of 29 of 100 cmrc2018
gold passages (16 of SmolLM2's 20 misses; with 1024: 95% gold-top, bench/RESULTS.md). English retrieval passages
rarely reach it."""


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut after its first `max_tokens` tokens, at a character boundary."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]


def as_user_turn(tokenizer, template: PromptTemplate, filled: str) -> str:
    """A chat template's user turn holding `filled`, ready for the reply (plain templates pass through)."""
    if not template.chat:
        return filled
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"template {template.name} needs a chat template, and this tokenizer has none; "
                         "use a template without _chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class RewardInputs:
    """Builds (prompt ids, continuation ids) for one teacher tokenizer and template."""

    tokenizer: object
    template: PromptTemplate
    max_passage_tokens: int = MAX_PASSAGE_TOKENS
    boundary_merges: int = field(default=0, init=False)
    tokens_built: int = field(default=0, init=False)  # prompt + continuation tokens handed out

    def truncate_passage(self, passage: str) -> str:
        return truncate_to_tokens(self.tokenizer, passage, self.max_passage_tokens)

    def prompt_text(self, question: str, passage: str) -> str:
        return as_user_turn(self.tokenizer, self.template, self.template.fill(self.truncate_passage(passage), question))

    def build(self, question: str, passage: str, answer: str | None = None) -> tuple[list[int], list[int]]:
        if self.template.continuation not in ("answer", "question"):
            raise UsageError(f"template {self.template.name} scores {self.template.continuation}; "
                             "build_relevance makes its pairs")
        continuation = answer if self.template.continuation == "answer" else question
        if not continuation:
            raise UsageError(f"template {self.template.name} scores the {self.template.continuation}, which is empty")
        return self._pair(self.prompt_text(question, passage), continuation)

    def build_relevance(self, question: str, passage: str) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, yes_label's ids, no_label's ids): both continuations follow the one prompt."""
        if self.template.continuation != "relevance":
            raise UsageError(f"template {self.template.name} scores the {self.template.continuation}, not relevance")
        prompt = self.prompt_text(question, passage)
        prompt_ids, yes_ids = self._pair(prompt, self.template.yes_label)
        _, no_ids = self._pair(prompt, self.template.no_label)
        self.tokens_built -= len(prompt_ids)  # the prompt is shown once
        return prompt_ids, yes_ids, no_ids

    def _pair(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        special = not self.template.chat  # a chat template writes its own BOS
        prompt_ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        full_ids = self.tokenizer(prompt + self.template.separator + continuation, add_special_tokens=special)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            continuation_ids = full_ids[len(prompt_ids):]
        else:
            self.boundary_merges += 1
            continuation_ids = self.tokenizer(self.template.separator + continuation, add_special_tokens=False)["input_ids"]
        self.tokens_built += len(prompt_ids) + len(continuation_ids)
        return prompt_ids, continuation_ids


@dataclass(frozen=True)
class RewardGroup:
    """One query's candidates to score: the question, its reference answers (may be empty), the passages."""

    question: str
    answers: Sequence[str]
    passages: Sequence[str]


@dataclass(frozen=True)
class Reward:
    """A passage's reward: the best normalised score over the reference answers, and which answer gave it."""

    value: float
    score: Score              # relevance: the yes_label's
    answer_index: int | None  # None for query likelihood and relevance
    no_score: Score | None = None  # relevance: the no_label's (value = score.logprob_sum - no_score.logprob_sum)


def score_groups(backend: Backend, inputs: RewardInputs, groups: Sequence[RewardGroup],
                 normalization: str = "mean") -> list[list[Reward]]:
    """Rewards for many queries' candidates, sent to the backend as one batch of pairs.

    With several reference answers each is scored and the maximum kept (by
    the normalised value). With a query-likelihood template the question
    itself is the continuation and the answers are ignored. With a relevance
    template the value is the difference of the two log-prob sums (never
    normalised: they are the log-probabilities of two words), answers ignored.
    """
    if normalization not in NORMALIZATIONS:
        raise UsageError(f"normalization {normalization!r} is not known; choose one of {sorted(NORMALIZATIONS)}")
    normalise = NORMALIZATIONS[normalization]
    if inputs.template.continuation == "relevance":
        return _relevance(backend, inputs, groups)
    pairs, owners = [], []  # owners[k] = (group, passage, answer index)
    for g, group in enumerate(groups):
        targets: list[str | None] = list(group.answers) if inputs.template.continuation == "answer" else [None]
        if not targets:
            raise UsageError(f"template {inputs.template.name} scores answers, and question {group.question!r} has none")
        for p, passage in enumerate(group.passages):
            for a, answer in enumerate(targets):
                pairs.append(inputs.build(group.question, passage, answer))
                owners.append((g, p, None if answer is None else a))
    scores = backend.score([p for p, _ in pairs], [c for _, c in pairs])
    best: list[list[Reward | None]] = [[None] * len(group.passages) for group in groups]
    for (g, p, a), score in zip(owners, scores):
        value = normalise(score)
        current = best[g][p]
        if current is None or value > current.value:
            best[g][p] = Reward(value, score, a)
    return best  # type: ignore[return-value]


def _relevance(backend: Backend, inputs: RewardInputs, groups: Sequence[RewardGroup]) -> list[list[Reward]]:
    """log p(yes_label) - log p(no_label) per passage; each passage's two pairs sent side by side."""
    prompts, continuations = [], []
    for group in groups:
        for passage in group.passages:
            prompt, yes, no = inputs.build_relevance(group.question, passage)
            prompts += [prompt, prompt]
            continuations += [yes, no]
    scores = iter(backend.score(prompts, continuations))
    out = []
    for group in groups:
        rewards = []
        for _ in group.passages:
            yes, no = next(scores), next(scores)
            rewards.append(Reward(yes.logprob_sum - no.logprob_sum, yes, None, no))
        out.append(rewards)
    return out
