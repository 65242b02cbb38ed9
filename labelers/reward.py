"""The teacher's reward: how likely the LLM finds the reference answer given a passage.

For query q with reference answer O = (o_1..o_m) and candidate passage C
(LLM-Embedder, Zhang et al. 2023; bge):

    log r(C) = Σ_i log p(o_i | prompt(C, q), o_<i)      (sum, nats)
    mean     = log r(C) / m                              (the original code's score)

Without a reference answer, query likelihood (UPR, Sachan et al. 2022) scores
log p(q | prompt(C)) instead. `RewardInputs.build` makes the token ids: the
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

logger = logging.getLogger(__name__)

NORMALIZATIONS = {"mean": lambda s: s.logprob_mean, "sum": lambda s: s.logprob_sum}


@dataclass
class RewardInputs:
    """Builds (prompt ids, continuation ids) for one teacher tokenizer and template."""

    tokenizer: object
    template: PromptTemplate
    max_passage_tokens: int = 384
    boundary_merges: int = field(default=0, init=False)

    def truncate_passage(self, passage: str) -> str:
        encoded = self.tokenizer(passage, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) <= self.max_passage_tokens:
            return passage
        return passage[: offsets[self.max_passage_tokens - 1][1]]

    def prompt_text(self, question: str, passage: str) -> str:
        filled = self.template.fill(self.truncate_passage(passage), question)
        if not self.template.chat:
            return filled
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"template {self.template.name} needs a chat template, and this tokenizer has none; "
                             "use a template without _chat")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=False,
                                                  add_generation_prompt=True)

    def build(self, question: str, passage: str, answer: str | None = None) -> tuple[list[int], list[int]]:
        continuation = answer if self.template.continuation == "answer" else question
        if not continuation:
            raise ValueError(f"template {self.template.name} scores the {self.template.continuation}, which is empty")
        prompt = self.prompt_text(question, passage)
        special = not self.template.chat  # a chat template writes its own BOS
        prompt_ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        full_ids = self.tokenizer(prompt + self.template.separator + continuation, add_special_tokens=special)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return prompt_ids, full_ids[len(prompt_ids):]
        self.boundary_merges += 1
        return prompt_ids, self.tokenizer(self.template.separator + continuation, add_special_tokens=False)["input_ids"]


def score_candidates(backend: Backend, inputs: RewardInputs, question: str, answers: Sequence[str],
                     passages: Sequence[str], normalization: str = "mean") -> list[tuple[Score, int]]:
    """Each passage's best score over the reference answers, and which answer gave it.

    "Best" is by the reward as normalised (`mean` per token, or `sum`).
    With a query-likelihood template, `answers` is ignored and the question is scored.
    """
    targets = list(answers) if inputs.template.continuation == "answer" else [None]
    if not targets:
        raise ValueError("an answer template needs at least one reference answer")
    pairs = [inputs.build(question, p, a) for p in passages for a in targets]
    scores = backend.score([p for p, _ in pairs], [c for _, c in pairs])
    best = []
    for i in range(len(passages)):
        group = scores[i * len(targets):(i + 1) * len(targets)]
        j = max(range(len(group)), key=lambda k: NORMALIZATIONS[normalization](group[k]))
        best.append((group[j], j))
    return best
