"""What a training run leaves for people: a PNG of its curves and a model card."""
from __future__ import annotations

from pathlib import Path

from ..data.records import TrainLogRecord


def plot_training(log: list[TrainLogRecord], output: Path, metric: str = "ndcg@10") -> Path | None:
    """Training loss (and each loss term) by step, and the dev metrics by step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log if r.kind == "train"]
    evals = [r for r in log if r.kind == "eval" and r.metrics]
    if not train and not evals:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r.step for r in train]
        left.plot(steps, [r.loss for r in train], label="loss", color="black")
        for name in sorted({k for r in train for k in (r.terms or {})}):
            if len(train[0].terms or {}) > 1:
                left.plot(steps, [(r.terms or {}).get(name) for r in train], label=name, alpha=0.7)
        for r in log:
            if r.kind == "remine":
                left.axvline(r.step, color="grey", alpha=0.3, linestyle=":")
    left.set_xlabel("step")
    left.set_title("training loss")
    if evals:
        steps = [r.step for r in evals]
        for name in (metric, "recall@10", "mrr@10"):
            right.plot(steps, [100 * r.metrics[name] for r in evals], marker="o", label=name)
    else:
        right.text(0.5, 0.5, "no dev split evaluated", ha="center", va="center", transform=right.transAxes)
    right.set_xlabel("step")
    right.set_title("dev metrics (%)")
    for axes in (left, right):
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def model_card(*, base_model: str, data: list[str], labels: list[str], teacher: str | None, objective: str,
               settings: dict, before: dict | None, after: dict | None, eval_split: str | None) -> str:
    """README.md for the saved model (sentence-transformers reads the folder; the hub shows this)."""
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags: [sentence-transformers, feature-extraction, llm-distill-retrieval]", f"base_model: {base_model}",
             "---", "", f"# Retriever distilled from {base_model}", "",
             "Trained with `distill train` (llm-distill-retrieval).", "",
             "| | |", "|---|---|",
             f"| base model | {base_model} |",
             f"| training data | {', '.join(data)} |",
             f"| labels / candidates | {', '.join(labels) if labels else 'qrels pairs (in-batch negatives)'} |",
             f"| teacher | {teacher or 'none (hard labels)'} |",
             f"| objective | `{objective}` |"]
    for key in ("epochs", "max_steps", "train_batch_size", "num_negatives", "learning_rate", "temperature",
                "scheduler", "warmup_ratio", "remine_steps", "dynamic_remine"):
        if key in settings:
            lines.append(f"| {key} | {settings[key]} |")
    if before or after:
        names = ["ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100"]
        lines += ["", f"## Retrieval on the {eval_split} split", "", "| | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for label, metrics in (("base", before), ("trained", after)):
            if metrics:
                lines.append(f"| {label} | " + " | ".join(f"{100 * metrics[n]:.2f}" for n in names) + " |")
    lines += ["", "```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer(\"path/to/this/folder\")",
              "embeddings = model.encode([\"a query\"], prompt_name=\"query\")", "```", ""]
    return "\n".join(lines)
