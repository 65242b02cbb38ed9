"""How well the teacher's rewards single out the gold passage, from `distill label` output.

    python bench/label_quality.py LABELS.jsonl [LABELS2.jsonl ...]

For labels made without `--candidates` (positives + random passages): the
share of queries whose best-rewarded passage is a positive (ties count as a
miss), and the AUC of positive vs random rewards, pooled over all queries and
averaged per query. Also the mean rewards and the label counts.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(positive > negative) + 0.5·P(tie), by ranks (Mann-Whitney U)."""
    if not len(positives) or not len(negatives):
        return float("nan")
    values = np.concatenate([positives, negatives])
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):  # average ranks over ties
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    u = ranks[:len(positives)].sum() - len(positives) * (len(positives) + 1) / 2
    return float(u / (len(positives) * len(negatives)))


def summarise(path: str) -> dict:
    top, per_query_auc, pos_all, neg_all, targets = 0, [], [], [], {}
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    for r in records:
        k = r["n_positives"]
        rewards = np.asarray(r["rewards"], dtype=np.float64)
        pos, neg = rewards[:k], rewards[k:]
        top += bool(len(neg) and pos.max() > neg.max())
        per_query_auc.append(auc(pos, neg))
        pos_all.append(pos)
        neg_all.append(neg)
        targets[r["target"]] = targets.get(r["target"], 0) + 1
    pos_all, neg_all = np.concatenate(pos_all), np.concatenate(neg_all)
    return {"file": path, "queries": len(records), "gold_top": top / len(records), "gold_top_count": top,
            "auc_pooled": auc(pos_all, neg_all), "auc_per_query": float(np.nanmean(per_query_auc)),
            "mean_reward_gold": float(pos_all.mean()), "mean_reward_random": float(neg_all.mean()),
            "targets": targets, "model": records[0]["model"], "prompt": records[0]["prompt"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", nargs="+")
    args = parser.parse_args()
    print("| labels | queries | gold passage rewarded highest | AUC gold vs random (pooled / per query) "
          "| mean reward gold / random | prompt |")
    print("|---|---|---|---|---|---|")
    for path in args.labels:
        s = summarise(path)
        print(f"| {s['file']} | {s['queries']} | {s['gold_top_count']}/{s['queries']} ({100 * s['gold_top']:.1f}%) "
              f"| {s['auc_pooled']:.4f} / {s['auc_per_query']:.4f} "
              f"| {s['mean_reward_gold']:.3f} / {s['mean_reward_random']:.3f} | {s['prompt']} |")


if __name__ == "__main__":
    main()
