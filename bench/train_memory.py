"""Training memory: the trainer's measured activation estimate against the peak RSS of real steps, and the
default plan on a 24 GiB machine (issue 20: it used to be SIGKILLed).

For each batch size, one `distill train` step without GradCache (a budget far above the estimate) in its own
process: the estimate from the training summary beside the process's peak RSS less its RSS after loading
(`/usr/bin/time -v`'s maximum resident set size minus a zero-step run's). Then the default plan (batch 32,
groups of 8, 256-token abstracts) on 300 scifact train claims, with every other setting at its default.
Labels are synthetic (positive first, BM25 negatives with decreasing rewards): memory does not depend on them.

python bench/train_memory.py --data ../shared/data/scifact --model <all-MiniLM-L6-v2 folder>
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def subset(data: Path, out: Path, queries: int) -> Path:
    folder = out / "subset"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(data / name, folder / name)
    header, *rows = (data / "qrels" / "train.tsv").read_text(encoding="utf-8").splitlines()
    qids = sorted({r.split("\t")[0] for r in rows})
    random.Random(0).shuffle(qids)
    keep = set(qids[:queries])
    (folder / "qrels" / "train.tsv").write_text(
        header + "\n" + "".join(r + "\n" for r in rows if r.split("\t")[0] in keep), encoding="utf-8")
    return folder


def synthetic_labels(folder: Path, out: Path) -> Path:
    candidates, labels = out / "cand.jsonl", out / "labels.jsonl"
    subprocess.run([sys.executable, "-m", "distill", "mine", "--data", str(folder), "--strategy", "bm25",
                    "--num-negatives", "7", "--output", str(candidates), "--no-show-progress"], check=True,
                   capture_output=True)
    with open(labels, "w", encoding="utf-8") as f:
        for line in candidates.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            pids = record["positives"] + record["pids"]
            f.write(json.dumps({"qid": record["qid"], "pids": pids, "rewards": [-0.5 * i for i in range(len(pids))],
                                "n_positives": len(record["positives"])}) + "\n")
    return labels


def train(model: str, folder: Path, labels: Path, out: Path, *extra: str) -> tuple[float, dict]:
    """(peak RSS in GiB, training summary) of one `distill train` process."""
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "distill", "train", "--model", model,
                             "--data", str(folder), "--labels", str(labels), "--output", str(out), "--no-cache",
                             "--no-show-progress", *extra], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return peak_kb / 2 ** 20, json.loads((out / "training_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--default-steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = subset(args.data, tmp, args.queries)
        labels = synthetic_labels(folder, tmp)
        loaded, _ = train(args.model, folder, labels, tmp / "zero", "--max-steps", "1", "--train-batch-size", "1",
                          "--num-negatives", "0", "--memory-budget-gb", "1000")
        print("| batch x group | texts | estimate (GiB) | peak RSS - loaded (GiB) | ratio |")
        print("|---|---|---|---|---|")
        for batch in args.batches:
            peak, summary = train(args.model, folder, labels, tmp / f"b{batch}", "--max-steps", "1",
                                  "--train-batch-size", str(batch), "--memory-budget-gb", "1000")
            estimate = summary["memory"]["step_activation_gib"]
            print(f"| {batch} x 8 | {batch * 9} | {estimate:.2f} | {peak - loaded:.2f} | "
                  f"{estimate / max(peak - loaded, 1e-9):.2f} |")
        peak, summary = train(args.model, folder, labels, tmp / "default", "--max-steps", str(args.default_steps))
        memory = summary["memory"]
        print(f"\ndefault plan, {summary['examples']} examples, {args.default_steps} steps: estimate "
              f"{memory['step_activation_gib']:.1f} GiB > budget {memory['budget_gib']:.1f} GiB -> GradCache chunks of "
              f"{memory['grad_cache_chunk_size']}; peak RSS {peak:.1f} GiB; {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
