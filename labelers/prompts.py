"""Prompt templates: plain-text files in `prompts/`, or the user's own file.

A template file starts with comment lines (`# ...`) that document it and
setting lines (`## key: value`):

- `chat`: true to wrap the filled prompt in the tokenizer's chat template as
  the user turn (the continuation is then the assistant's reply);
- `continuation`: `answer` (answer-likelihood reward), `question` (query
  likelihood, UPR), `relevance` (relevance classification, Gecko: the
  reward is log p(yes_label) - log p(no_label) after the prompt) or `pair`
  (the LLM writes a question and its answer: query generation);
- `separator`: JSON string put between prompt and continuation, e.g. `" "`;
- `question_label`, `answer_label` (pair templates): JSON strings that start
  the generated question (the prompt ends with it) and the answer, e.g.
  `"Question:"` and `"Answer:"`;
- `yes_label`, `no_label` (relevance templates): JSON strings, the two
  continuations compared, e.g. `"Yes"` and `"No"` (the default).

The rest is the body, with `{passage}`; answer and relevance templates also hold
`{question}`, pair templates `{examples}` (the few-shot block).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from .errors import UsageError

SETTINGS = {"chat", "continuation", "separator", "question_label", "answer_label", "yes_label", "no_label"}
CONTINUATIONS = ("answer", "question", "relevance", "pair")
NEEDS_QUESTION = ("answer", "relevance")  # continuations whose body shows the question


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    body: str
    chat: bool
    continuation: str  # "answer" | "question" | "relevance" | "pair"
    separator: str
    question_label: str = "Question:"
    answer_label: str = "Answer:"
    yes_label: str = "Yes"
    no_label: str = "No"

    def fill(self, passage: str, question: str = "", examples: str = "") -> str:
        # replace, not str.format: passages may hold braces; the passage goes in last so its text is never read
        # as a placeholder
        filled = self.body.replace("{question}", question).replace("{examples}", examples)
        return filled.replace("{passage}", passage)


def packaged_templates() -> dict[str, Path]:
    import prompts  # the data package installed beside labelers

    folder = Path(prompts.__file__).parent
    return {p.stem: p for p in sorted(folder.glob("*.txt"))}


def parse_template(text: str, name: str) -> PromptTemplate:
    settings: dict[str, str] = {}
    body_lines: list[str] = []
    for line in text.splitlines():
        if not body_lines and line.startswith("##"):
            key, _, value = line[2:].partition(":")
            if key.strip() not in SETTINGS:
                raise UsageError(f"{name}: unknown setting {key.strip()!r}; known: {sorted(SETTINGS)}")
            settings[key.strip()] = value.strip()
        elif not body_lines and line.startswith("#"):
            continue
        else:
            body_lines.append(line)
    body = "\n".join(body_lines).strip("\n")
    continuation = settings.get("continuation", "answer")
    if continuation not in CONTINUATIONS:
        raise UsageError(f"{name}: continuation must be one of {CONTINUATIONS}, got {continuation!r}")
    if "{passage}" not in body or (continuation in NEEDS_QUESTION and "{question}" not in body):
        raise UsageError(f"{name}: the body must contain {{passage}}"
                         + (" and {question}" if continuation in NEEDS_QUESTION else ""))
    chat = settings.get("chat", "false").lower()
    if chat not in ("true", "false"):
        raise UsageError(f"{name}: setting 'chat': must be true or false, got {settings['chat']!r}")
    labels = ("question_label", "answer_label", "yes_label", "no_label")
    template = PromptTemplate(name=name, body=body, chat=chat == "true", continuation=continuation,
                              separator=_json_string(name, "separator", settings.get("separator", '""')),
                              **{k: _json_string(name, k, settings[k]) for k in labels if k in settings})
    if continuation == "relevance" and (not (template.yes_label and template.no_label)
                                        or template.yes_label == template.no_label):
        raise UsageError(f"{name}: a relevance template compares two different, non-empty continuations; "
                         f"yes_label {template.yes_label!r} and no_label {template.no_label!r} are not")
    return template


def _json_string(name: str, key: str, value: str) -> str:
    """A `## key: value` setting whose value is a JSON string such as `" "` or `"Question:"`."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, str):
        raise UsageError(f"{name}: setting {key!r}: {value!r} is not a JSON string; write it in double quotes, "
                         'e.g.  ## separator: " "  for one space')
    return parsed


def load_template(name_or_path: str) -> PromptTemplate:
    """A packaged template by name (e.g. `reward_en_chat`) or a file path."""
    path = Path(name_or_path)
    if path.is_file():
        return parse_template(path.read_text(encoding="utf-8"), str(path))
    available = packaged_templates()
    if name_or_path not in available:
        raise UsageError(f"prompt template {name_or_path!r} is neither a file nor a packaged template "
                         f"({', '.join(sorted(available))})")
    return parse_template(available[name_or_path].read_text(encoding="utf-8"), name_or_path)


def resolve_template(given: str | None, kind: str, language: str, chat: bool,
                     continuation: str | None = None) -> PromptTemplate:
    """The template a stage uses for `kind` (reward, query_likelihood, relevance, generate): the one the user
    named (a packaged name or a file), else the packaged `<kind>_<language>[_chat]`, the chat variant when the
    teacher's tokenizer has a chat template. With `continuation`, a template that scores something else (a
    question where an answer is meant) is refused, naming it."""
    name = given
    if name is None:
        name = f"{kind}_{language}"
        name = f"{name}_chat" if chat and f"{name}_chat" in packaged_templates() else name
    template = load_template(name)
    if continuation is not None and template.continuation != continuation:
        raise UsageError(f"template {template.name} scores the {template.continuation}; a {kind} template must score "
                         f"the {continuation}")
    return template
