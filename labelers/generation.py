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

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .backends.base import Backend, Sampling
from .prompts import PromptTemplate
from .reward import MAX_PASSAGE_TOKENS, as_user_turn, truncate_to_tokens
from .errors import UsageError


@dataclass(frozen=True)
class FewShotExample:
    passage: str
    question: str
    answer: str


def load_few_shot(path: str | Path) -> list[FewShotExample]:
    """Few-shot examples from JSON Lines `{"passage", "question", "answer"}` (UTF-8); errors name file, line and
    field. A file without one example is an error: a run asked for few-shot prompts would go on zero-shot."""
    examples = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line_no = Path(path).read_bytes()[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line_no}: not UTF-8 (byte {exc.object[exc.start]:#04x}); save the file as "
                         "UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{line_no}: a line must be a JSON object {{\"passage\", \"question\", "
                             f"\"answer\"}}, not a JSON {type(record).__name__}")
        for key in ("passage", "question", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise UsageError(f'{path}:{line_no}: field "{key}": missing or empty')
        examples.append(FewShotExample(record["passage"], record["question"], record["answer"]))
    if not examples:
        raise UsageError(f"{path}: holds no few-shot example (one JSON object per line); to generate without "
                         "examples, set --num-few-shot 0 instead")
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
    max_passage_tokens: int = MAX_PASSAGE_TOKENS

    def __post_init__(self):
        if self.template.continuation != "pair":
            raise UsageError(f"template {self.template.name} is not a query-generation (pair) template")

    def truncate(self, passage: str) -> str:
        return truncate_to_tokens(self.tokenizer, passage, self.max_passage_tokens)

    @property
    def passage_label(self) -> str:
        return "文章：" if "文章：" in self.template.body else "Passage: "

    def examples_block(self) -> str:
        """Each example as the passage the prompt will show, then its question and answer lines."""
        t = self.template
        blocks = [f"\n{self.passage_label}{self.truncate(e.passage)}\n{t.question_label} {e.question}\n"
                  f"{t.answer_label} {e.answer}\n" for e in self.examples]
        return "".join(blocks)

    def stops(self) -> tuple[str, ...]:
        """Where a pair has ended: the start of another question or passage, which a small LLM writes
        next in imitation of the few-shot block. Sampling stops there. (Not at a blank line: SmolLM2
        often writes one between the question and the answer label.)"""
        return ("\n" + self.template.question_label, "\n" + self.passage_label.strip())

    def answer_cue(self, question: str) -> list[int]:
        """Tokens that follow the prompt to ask for `question`'s answer: " <question>\n<answer label>"."""
        text = f" {question}\n{self.template.answer_label}"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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


def question_only(completion: str, template: PromptTemplate) -> str | None:
    """The question of a completion that stopped before writing the answer label, else None."""
    if template.answer_label in completion:
        return None
    lines = completion.strip().splitlines()
    return lines[0].strip() if lines and lines[0].strip() else None


@dataclass(frozen=True)
class Generation:
    """One sampled completion for a passage, parsed (question/answer None when parsing failed);
    `completed` when the answer was written by the greedy second pass."""

    passage_index: int
    sample: int
    raw: str
    question: str | None
    answer: str | None
    completed: bool = False


def generate_pairs(backend: Backend, prompts: PairPrompts, passages: Sequence[str], sampling: Sampling,
                   max_new_tokens: int = 64, complete_answers: bool = True) -> list[Generation]:
    """`sampling.n` parsed generations per passage, in (passage, sample) order.

    Sampling stops at the end of a pair (`PairPrompts.stops`). With `complete_answers`, a sample
    that wrote a question and stopped (SmolLM2-135M does so for about a quarter of them) gets its
    answer from a greedy continuation of prompt + question + answer label, as the labeller's
    missing-answer option does for real queries, instead of being lost to the parse filter.
    """
    ids = [prompts.build(p) for p in passages]
    sampling = dataclasses.replace(sampling, stop=sampling.stop or prompts.stops())
    out = []
    for i, completions in enumerate(backend.generate(ids, max_new_tokens, sampling)):
        for k, raw in enumerate(completions):
            parsed = parse_pair(raw, prompts.template)
            out.append(Generation(i, k, raw, *(parsed or (None, None))))
    return fill_missing_answers(backend, prompts, ids, out, max_new_tokens) if complete_answers else out


def fill_missing_answers(backend: Backend, prompts: PairPrompts, prompt_ids: Sequence[Sequence[int]],
                         generations: Sequence[Generation], max_new_tokens: int = 64) -> list[Generation]:
    """Each question-only generation with the greedy answer to prompt + " <question>\n<answer label>"
    (one line), marked `completed`; the others as they were. The prompts are those just sampled from: the
    hf backend keeps their keys and values from that call and vLLM its prefix cache, so only the question
    and the label run again."""
    out = list(generations)
    asked = [(k, question_only(g.raw, prompts.template)) for k, g in enumerate(out) if g.question is None]
    asked = [(k, q) for k, q in asked if q is not None]
    if asked:
        cues = [list(prompt_ids[out[k].passage_index]) + prompts.answer_cue(q) for k, q in asked]
        answers = backend.generate(cues, max_new_tokens, Sampling(stop=("\n",)))
        for (k, question), (answer,) in zip(asked, answers):
            if answer.strip():
                out[k] = dataclasses.replace(out[k], question=question, answer=answer.strip(), completed=True)
    return out
