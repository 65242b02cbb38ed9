"""The run report: one PNG with the teacher's reward distributions, the training curve and the metrics before,
after and of the control student (trained on the same pools without the teacher), under the run's summary lines
(the student against the base, the control against the base, what the teacher added over the control)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.records import read_labels, read_train_log

METRICS = ("ndcg@10", "recall@1", "recall@10", "mrr@10")


def reward_split(labels: Path) -> tuple[list[float], list[float]]:
    """(rewards of labelled positives, rewards of the other candidates) over a labels file."""
    positives, negatives = [], []
    for record in read_labels(labels):
        n = record.n_positives
        positives += record.rewards[:n]
        negatives += record.rewards[n:]
    return positives, negatives


def write_run_report(run_dir: Path, before: dict, after: dict, output: Path | None = None,
                     control: dict | None = None, lines: Sequence[str] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    output = output or run_dir / "report.png"
    fig, (rewards, curve, bars) = plt.subplots(1, 3, figsize=(15, 4 + 0.25 * len(lines)))
    labels = run_dir / "labels.jsonl"
    if labels.is_file():
        positives, negatives = reward_split(labels)
        if positives or negatives:
            low, high = min(positives + negatives), max(positives + negatives)
            bins = [low + (high - low) * i / 40 for i in range(41)]
            if positives:
                rewards.hist(negatives, bins=bins, alpha=0.6, density=True, label=f"negatives ({len(negatives)})")
                rewards.hist(positives, bins=bins, alpha=0.6, density=True, label=f"positives ({len(positives)})")
            else:  # queries without qrels: the whole pool, before training chose its positives
                rewards.hist(negatives, bins=bins, alpha=0.6, density=True, label=f"pool, no qrels ({len(negatives)})")
            rewards.legend()
    rewards.set_title("teacher reward (mean answer log-prob)")
    rewards.set_xlabel("nats / token")
    for folder, name, color in (("model", "student", "black"), ("control", "control", "tab:orange")):
        log = [r for r in read_train_log(run_dir / folder / "train_log.jsonl") if r.kind == "train"] \
            if (folder == "model" or control) else []
        if log:
            curve.plot([r.step for r in log], [r.loss for r in log], color=color, marker=".", label=name)
    if control:
        curve.legend()
    curve.set_title("training loss")
    curve.set_xlabel("step")
    x = range(len(METRICS))
    shown = {"before": before, **({"control": control} if control else {}), "after": after}
    width = 0.8 / len(shown)
    for j, (name, evaluation) in enumerate(shown.items()):
        offset = (j - (len(shown) - 1) / 2) * width
        bars.bar([i + offset for i in x], [100 * evaluation[m] for m in METRICS], width=width, label=name)
        if name == "before":
            continue
        comparison = evaluation.get("ndcg@10_vs_baseline")
        for i, m in enumerate(METRICS):
            label, top = f"{100 * (evaluation[m] - before[m]):+.1f}", 100 * evaluation[m]
            if m == "ndcg@10" and comparison:
                # The paired interval of the mean per-query gain, drawn around the bar (before + gain).
                low, high = (100 * (before[m] + comparison[k]) for k in ("low", "high"))
                bars.errorbar(i + offset, top, yerr=[[top - low], [high - top]], color="black", capsize=4)
                label += f"\n[{100 * comparison['low']:+.1f}, {100 * comparison['high']:+.1f}]"
                top = max(top, high)
            bars.text(i + offset, top, label, ha="center", va="bottom", fontsize=7)
    comparison = after.get("ndcg@10_vs_baseline")
    lowest = min(100 * min(e[m] for e in shown.values()) for m in METRICS)
    floor = max(0.0, lowest - 10)
    bars.set_ylim(floor, 100)
    if floor > 0:  # say so: bars that do not start at zero make small gains look large
        bars.text(0.01, 0.01, f"y axis starts at {floor:.0f}, not 0", transform=bars.transAxes, fontsize=8,
                  color="firebrick", va="bottom")
    bars.set_xticks(list(x), METRICS)
    interval = f" (nDCG@10: {100 * comparison['confidence']:.0f}% CI)" if comparison else ""
    bars.set_title("test metrics" + interval)
    bars.legend(loc="lower right")
    if lines:  # the run's summary, one line each, above the panels
        fig.suptitle("\n".join(lines), fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
