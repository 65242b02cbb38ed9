"""Pools that hold the positive (issue 45.5): the teacher can only choose what the pool holds.

For N train queries of a set with qrels, withheld as bench/label_free.py withholds them, mine label-free pools
(`distill mine --pool-size K`, no qrels read) with each strategy (dense: the student's top K; bm25; hybrid:
the two interleaved) at K = 8 and 16, and count the share of queries whose true positive is in the pool (pool
recall), with its Wilson 95% interval. At equal K the labelling cost is equal (K passages scored per query), so
the strategy with the higher recall is the better label-free default.

python bench/pool_recall.py --data ../shared/data/squad_dev --model <MiniLM> --out runs/pool_recall/squad
python bench/pool_recall.py --data ../shared/data/scifact --model <MiniLM> --out runs/pool_recall/scifact
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_free import distill, folders  # noqa: E402

from distill.data import load_retrieval_set  # noqa: E402
from distill.stages.check_teacher import Share  # noqa: E402

STRATEGIES = ("dense", "bm25", "hybrid")
SIZES = (8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    free, gold = folders(args.data, args.out, args.queries, args.seed, keep_answers=True)
    truth = load_retrieval_set(gold, "train")
    rows = {}
    for strategy in STRATEGIES:
        for size in SIZES:
            pool = args.out / f"{strategy}-{size}.jsonl"
            distill("mine", "--model", args.model, "--data", str(free), "--strategy", strategy, "--pool-size",
                    str(size), "--output", str(pool))
            lines = [json.loads(line) for line in pool.read_text(encoding="utf-8").splitlines() if line.strip()]
            hits = sum(bool(set(r["pids"]) & set(truth.positives(r["qid"]))) for r in lines)
            rows[(strategy, size)] = Share(hits, len(lines))
    print(f"\n{args.data.name}: {args.queries} train queries, the true positive in the label-free pool")
    print("| strategy | " + " | ".join(f"pool of {k}" for k in SIZES) + " |")
    print("|---" * (len(SIZES) + 1) + "|")
    for strategy in STRATEGIES:
        print(f"| {strategy} | " + " | ".join(rows[(strategy, k)].describe() for k in SIZES) + " |")


if __name__ == "__main__":
    main()
