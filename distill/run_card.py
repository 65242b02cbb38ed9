"""The model card `distill run` leaves in `OUTPUT_DIR/model/README.md`: where the model came from and what it
measured, in sentence-transformers' card layout, so the Hugging Face Hub shows the figures.

The front matter carries a `model-index` block (task information-retrieval, the evaluation set, one metric per
`distill eval` figure of the trained student, as sentence-transformers' `InformationRetrievalEvaluator` names
them: `cosine_ndcg@10`, ...). The body says how it was made (base model, teacher, supervision, how positives
were chosen, pool size, queries kept), the teacher check's figures when it ran, and the gains with their paired
95% intervals: the student against the base, the control (the same pools without the teacher) against the base,
and the student against the control, which is what the teacher added.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .metrics import PairedComparison

CARD_METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "recall@100", "map@100")


@dataclass(frozen=True)
class RunFacts:
    """What a finished `distill run` knows about its student."""

    base_model: str
    teacher: str
    supervision: str                   # qrels | answers | queries | raw_text, with its reason
    positives: str                     # the train stage's --positives
    pool_size: int | None
    queries_kept: int
    queries_left_out: dict[str, int]   # reason -> count
    eval_data: str
    eval_split: str
    eval_queries: int
    before: dict[str, float]
    after: dict[str, float]
    gain: PairedComparison | None = None              # the student against the base
    control_name: str | None = None                   # self-training | hard-labels
    control: dict[str, float] | None = None
    control_gain: PairedComparison | None = None      # the control against the base
    teacher_added: PairedComparison | None = None     # the student against the control
    check: dict | None = None                         # the teacher check's figures, when it ran
    loss: str = ""
    extra: dict = field(default_factory=dict)


def _gain_line(name: str, comparison: PairedComparison | None) -> str | None:
    return None if comparison is None else f"| {name} | {comparison.describe(unit='')} |"


def run_model_card(facts: RunFacts) -> str:
    """README.md text (YAML front matter, then Markdown) for the student of a finished run."""
    import yaml

    dataset = f"{facts.eval_data} ({facts.eval_split})"
    front = {
        "library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "feature-extraction", "llm-distill-retrieval"],
        "base_model": facts.base_model,
        "model-index": [{"name": f"{facts.base_model} distilled from {facts.teacher}", "results": [{
            "task": {"type": "information-retrieval", "name": "Information Retrieval"},
            "dataset": {"name": dataset, "type": facts.eval_data, "split": facts.eval_split},
            "metrics": [{"type": f"cosine_{m}", "value": round(float(facts.after[m]), 4),
                         "name": f"Cosine {m.capitalize()}"} for m in CARD_METRICS if m in facts.after]}]}]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {facts.base_model}, distilled from {facts.teacher}", "",
             "Trained with `distill run` (llm-distill-retrieval): the teacher LLM scored the student's own "
             "candidate passages, and the student learned from those scores.", "",
             "## How it was made", "", "| | |", "|---|---|",
             f"| base model | {facts.base_model} |", f"| teacher | {facts.teacher} |",
             f"| supervision | {facts.supervision} |", f"| positives | `{facts.positives}` |",
             f"| pool size | {facts.pool_size if facts.pool_size is not None else 'mined negatives'} |",
             f"| queries kept | {facts.queries_kept}" + (
                 " (left out: " + ", ".join(f"{n} {why}" for why, n in facts.queries_left_out.items()) + ")"
                 if facts.queries_left_out else "") + " |",
             f"| objective | `{facts.loss}` |"]
    if facts.check:
        lines += ["", "## The teacher check (before labelling)", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in facts.check.items()]
    names = [m for m in CARD_METRICS if m in facts.after]
    lines += ["", f"## Retrieval on {dataset}, {facts.eval_queries} queries", "",
              "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = [("base", facts.before), (facts.control_name or "control", facts.control), ("this model", facts.after)]
    lines += [f"| {label} | " + " | ".join(f"{100 * metrics[n]:.2f}" for n in names) + " |"
              for label, metrics in rows if metrics]
    gains = [_gain_line("this model against the base", facts.gain),
             _gain_line(f"{facts.control_name or 'the control'} against the base", facts.control_gain),
             _gain_line(f"what the teacher added (this model against {facts.control_name or 'the control'})",
                        facts.teacher_added)]
    if any(gains):
        lines += ["", "## nDCG@10 gains (points, paired 95% interval and randomization p)", "", "| | |", "|---|---|",
                  *[g for g in gains if g]]
    lines += ["", "```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer(\"path/to/this/folder\")",
              "embeddings = model.encode([\"a query\"], prompt_name=\"query\")", "```", ""]
    return "\n".join(lines)
