"""Synthetic queries from raw passages: the LLM writes (question, answer) pairs.

InPars (Bonifacio et al. 2022) and Promptagator (Dai et al. 2022) prompt an
LLM with a few (passage, question) examples and a new passage, and sample
questions for it; here the LLM also writes the question's answer, a short
phrase from the passage, so the pair can be labelled with the answer-likelihood
reward like real supervised data. A `pair` template (see `prompts`) holds the
instruction, `{examples}` and `{passage}`; the prompt ends with the template's
question label, so the completion reads "<question>\\n<answer label> <answer>",
which `parse_pair` splits.

Works on in-memory passages and token ids; the stage that reads and writes
files is `distill.stages.generate`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .backends.base import Backend, Sampling
from .prompts import PromptTemplate
from .reward import as_user_turn, truncate_to_tokens


@dataclass(frozen=True)
class FewShotExample:
    passage: str
    question: str
    answer: str


def load_examples(path: str | Path) -> list[FewShotExample]:
    """Few-shot examples from JSON Lines `{"passage", "question", "answer"}`; errors name file, line and field."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            for key in ("passage", "question", "answer"):
                if not isinstance(record.get(key), str) or not record[key].strip():
                    raise ValueError(f"{path}:{line_no}: field {key!r}: missing or empty")
            examples.append(FewShotExample(record["passage"], record["question"], record["answer"]))
    return examples


def packaged_examples(language: str) -> Path:
    import prompts

    return Path(prompts.__file__).parent / f"generate_examples_{language}.jsonl"


@dataclass
class PairPrompts:
    """Token ids of the generation prompt for each passage, for one teacher tokenizer and `pair` template."""

    tokenizer: object
    template: PromptTemplate
    examples: Sequence[FewShotExample] = ()
    max_passage_tokens: int = 384

    def __post_init__(self):
        if self.template.continuation != "pair":
            raise ValueError(f"template {self.template.name} is not a query-generation (pair) template")

    def truncate(self, passage: str) -> str:
        return truncate_to_tokens(self.tokenizer, passage, self.max_passage_tokens)

    def examples_block(self) -> str:
        """Each example as the passage the prompt will show, then its question and answer lines."""
        t = self.template
        passage_label = "文章：" if "文章：" in t.body else "Passage: "
        blocks = [f"\n{passage_label}{self.truncate(e.passage)}\n{t.question_label} {e.question}\n"
                  f"{t.answer_label} {e.answer}\n" for e in self.examples]
        return "".join(blocks)

    def text(self, passage: str) -> str:
        t = self.template
        filled = t.fill(self.truncate(passage), examples=self.examples_block())
        return as_user_turn(self.tokenizer, t, filled if t.chat else filled + "\n") + t.question_label

    def build(self, passage: str) -> list[int]:
        return self.tokenizer(self.text(passage), add_special_tokens=not self.template.chat)["input_ids"]


def parse_pair(completion: str, template: PromptTemplate) -> tuple[str, str] | None:
    """(question, answer) from "<question>\\n<answer label> <answer>[\\n...]"; None when either is missing."""
    question, label, rest = completion.partition(template.answer_label)
    if not label:
        return None
    question = question.strip().splitlines()[0].strip() if question.strip() else ""
    answer = rest.strip().splitlines()[0].strip() if rest.strip() else ""
    # a model that goes on writing the next example starts a new question label on the answer's line
    answer = answer.split(template.question_label)[0].strip()
    if not question or not answer:
        return None
    return question, answer


@dataclass(frozen=True)
class Generation:
    """One sampled completion for a passage, parsed (question/answer None when parsing failed)."""

    passage_index: int
    sample: int
    raw: str
    question: str | None
    answer: str | None


def generate_pairs(backend: Backend, prompts: PairPrompts, passages: Sequence[str], sampling: Sampling,
                   max_new_tokens: int = 64) -> list[Generation]:
    """`sampling.n` parsed generations per passage, in (passage, sample) order."""
    ids = [prompts.build(p) for p in passages]
    out = []
    for i, completions in enumerate(backend.generate(ids, max_new_tokens, sampling)):
        for k, raw in enumerate(completions):
            parsed = parse_pair(raw, prompts.template)
            out.append(Generation(i, k, raw, *(parsed or (None, None))))
    return out
